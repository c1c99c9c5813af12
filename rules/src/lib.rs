//! edgestream-rules: compiles rule text into a plan and evaluates it on readings.
