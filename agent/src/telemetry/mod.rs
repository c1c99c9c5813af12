//! What the agent tells about itself: counters for every stage, the Prometheus endpoint, the
//! periodic health message and the process figures in it.
//!
//! - [`metrics`]: the counters;
//! - [`modbus_slaves`]: the Modbus slaves' own figures, listed in the health message;
//! - [`prometheus`]: the endpoint (`[metrics]`);
//! - [`health`]: the health message and process figures (`[health]`);
//! - [`config`]: the `[health]`, `[log]` and `[metrics]` sections.

pub mod config;
pub mod health;
pub mod metrics;
pub mod modbus_slaves;
pub mod prometheus;
