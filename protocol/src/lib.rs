//! edgestream-protocol: the contract between edgestream, its devices and the cloud.
#![cfg_attr(not(feature = "std"), no_std)]

pub mod limits;
