//! edgestream-sim: simulated devices, brokers and network faults.
