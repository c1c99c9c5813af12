//! Deterministic sensor signals with injectable faults.
//!
//! A [`Signal`] turns *signal time* (seconds since the device started, in the
//! device's own clock, which may run faster than wall time) into a reading.
//! The same seed, profile and faults give the same sequence of values on
//! every run and every machine, so a test can assert on exact behaviour and a
//! failing run can be replayed.
//!
//! A value is `base shape (profile) + noise`, then transformed by whichever
//! [`Fault`]s are active at that time, in the order they were added:
//! excursions replace the value with a ramp toward a target, drift adds a
//! growing offset, a spike adds a one-sample jump, a flatline repeats the last
//! value, a dropout yields no reading at all (`None`).

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

/// Seconds in the "day" of the daily sine. A real day would make the sine
/// invisible in a short test, so a simulated day is one hour of signal time.
pub const SIM_DAY_S: f64 = 3600.0;

/// The base shape of a metric. Numbers are in the metric's unit.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Profile {
    /// Slow drift plus a daily sine: `mean + amplitude*sin(2πt/SIM_DAY_S) +
    /// drift_per_hour*t/3600`.
    Temperature {
        /// Average value (°C).
        mean: f64,
        /// Half the peak-to-peak of the daily sine.
        daily_amplitude: f64,
        /// Linear drift per hour of signal time.
        drift_per_hour: f64,
    },
    /// A pressure that breathes with a short period (pumps cycling).
    Pressure {
        /// Average value (bar).
        mean: f64,
        /// Amplitude of the cycle.
        amplitude: f64,
        /// Period of the cycle in seconds.
        period_s: f64,
    },
    /// RMS vibration: a baseline plus a rectified fast oscillation.
    Vibration {
        /// Baseline RMS (mm/s).
        baseline: f64,
        /// Extra amplitude at the running frequency.
        amplitude: f64,
    },
    /// Relative humidity, clamped to 0..=100.
    Humidity {
        /// Average value (%).
        mean: f64,
        /// Daily amplitude.
        daily_amplitude: f64,
    },
    /// A constant value (plus noise).
    Constant(f64),
}

impl Profile {
    fn shape(&self, t: f64) -> f64 {
        use std::f64::consts::TAU;
        match *self {
            Profile::Temperature {
                mean,
                daily_amplitude,
                drift_per_hour,
            } => mean + daily_amplitude * (TAU * t / SIM_DAY_S).sin() + drift_per_hour * t / 3600.0,
            Profile::Pressure {
                mean,
                amplitude,
                period_s,
            } => mean + amplitude * (TAU * t / period_s.max(0.001)).sin(),
            Profile::Vibration {
                baseline,
                amplitude,
            } => baseline + amplitude * (TAU * t / 7.0).sin().abs(),
            Profile::Humidity {
                mean,
                daily_amplitude,
            } => mean - daily_amplitude * (TAU * t / SIM_DAY_S).sin(),
            Profile::Constant(v) => v,
        }
    }

    fn clamp(&self, v: f64) -> f64 {
        match self {
            Profile::Humidity { .. } => v.clamp(0.0, 100.0),
            Profile::Vibration { .. } => v.max(0.0),
            _ => v,
        }
    }
}

/// What a fault does while it is active.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum FaultKind {
    /// Move linearly to `target` over `ramp_s`, hold it, and snap back to
    /// the normal signal when the fault ends (an overheating boiler).
    Excursion {
        /// Value held after the ramp.
        target: f64,
        /// Seconds to reach it.
        ramp_s: f64,
    },
    /// Add `per_s * (t - start)`: a sensor losing calibration.
    Drift {
        /// Offset gained per second.
        per_s: f64,
    },
    /// Add `magnitude` to the first sample at or after `start` only.
    Spike {
        /// Size of the jump.
        magnitude: f64,
    },
    /// Repeat the last value produced before the fault (a stuck sensor).
    Flatline,
    /// Produce no reading (the sensor is silent).
    Dropout,
}

/// A fault active on `[start_s, start_s + duration_s)` of signal time.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fault {
    /// Signal time at which it starts.
    pub start_s: f64,
    /// How long it lasts.
    pub duration_s: f64,
    /// What it does.
    pub kind: FaultKind,
}

impl Fault {
    fn active(&self, t: f64) -> bool {
        t >= self.start_s && t < self.start_s + self.duration_s
    }
}

/// A metric's signal. See the module docs.
#[derive(Debug, Clone)]
pub struct Signal {
    profile: Profile,
    noise: f64,
    faults: Vec<Fault>,
    rng: StdRng,
    last: Option<f64>,
    spikes_fired: Vec<bool>,
}

impl Signal {
    /// A signal with the given shape, noise standard deviation and seed.
    pub fn new(profile: Profile, noise: f64, seed: u64) -> Self {
        Signal {
            profile,
            noise,
            faults: Vec::new(),
            rng: StdRng::seed_from_u64(seed),
            last: None,
            spikes_fired: Vec::new(),
        }
    }

    /// Typical boiler/room temperature around `mean` °C.
    pub fn temperature(mean: f64, seed: u64) -> Self {
        Self::new(
            Profile::Temperature {
                mean,
                daily_amplitude: 2.0,
                drift_per_hour: 0.5,
            },
            0.2,
            seed,
        )
    }

    /// Pressure around `mean` bar.
    pub fn pressure(mean: f64, seed: u64) -> Self {
        Self::new(
            Profile::Pressure {
                mean,
                amplitude: 0.05 * mean,
                period_s: 60.0,
            },
            0.01 * mean,
            seed,
        )
    }

    /// Vibration around `baseline` mm/s RMS.
    pub fn vibration(baseline: f64, seed: u64) -> Self {
        Self::new(
            Profile::Vibration {
                baseline,
                amplitude: 0.3 * baseline,
            },
            0.05 * baseline,
            seed,
        )
    }

    /// Relative humidity around `mean` %.
    pub fn humidity(mean: f64, seed: u64) -> Self {
        Self::new(
            Profile::Humidity {
                mean,
                daily_amplitude: 8.0,
            },
            0.5,
            seed,
        )
    }

    /// A plausible signal for a metric named `metric`: temperature,
    /// pressure, vibration and humidity (also matched as substrings, e.g.
    /// `water_temperature`) get their profiles; anything else is a constant
    /// 50 with noise.
    pub fn for_metric(metric: &str, seed: u64) -> Self {
        let m = metric.to_ascii_lowercase();
        if m.contains("temp") {
            Self::temperature(22.0, seed)
        } else if m.contains("press") {
            Self::pressure(2.0, seed)
        } else if m.contains("vib") {
            Self::vibration(2.0, seed)
        } else if m.contains("hum") {
            Self::humidity(50.0, seed)
        } else {
            Self::new(Profile::Constant(50.0), 1.0, seed)
        }
    }

    /// Adds a fault (builder style).
    pub fn with_fault(mut self, fault: Fault) -> Self {
        self.add_fault(fault);
        self
    }

    /// Adds a fault.
    pub fn add_fault(&mut self, fault: Fault) {
        self.faults.push(fault);
        self.spikes_fired.push(false);
    }

    /// The faults in the order they apply.
    pub fn faults(&self) -> &[Fault] {
        &self.faults
    }

    /// The shape.
    pub fn profile(&self) -> Profile {
        self.profile
    }

    /// The value at signal time `t` seconds, or `None` during a dropout.
    /// Call with non-decreasing `t`: flatline and spike faults remember
    /// what came before.
    pub fn sample(&mut self, t: f64) -> Option<f64> {
        // Always draw the noise so that faults do not shift the random
        // sequence of later samples.
        let noise = self.noise * self.gaussian();
        let mut v = self.profile.shape(t) + noise;
        for (i, f) in self.faults.iter().enumerate() {
            if !f.active(t) {
                continue;
            }
            match f.kind {
                FaultKind::Excursion { target, ramp_s } => {
                    let k = if ramp_s <= 0.0 {
                        1.0
                    } else {
                        ((t - f.start_s) / ramp_s).clamp(0.0, 1.0)
                    };
                    v = v + (target - v) * k + noise * k;
                }
                FaultKind::Drift { per_s } => v += per_s * (t - f.start_s),
                FaultKind::Spike { magnitude } => {
                    if !self.spikes_fired[i] {
                        self.spikes_fired[i] = true;
                        v += magnitude;
                    }
                }
                FaultKind::Flatline => {
                    if let Some(last) = self.last {
                        v = last;
                    }
                }
                FaultKind::Dropout => return None,
            }
        }
        let v = self.profile.clamp(v);
        self.last = Some(v);
        Some(v)
    }

    /// Standard normal by Irwin-Hall (sum of 12 uniforms - 6): no extra crate
    /// and plenty for sensor noise.
    fn gaussian(&mut self) -> f64 {
        (0..12).map(|_| self.rng.random::<f64>()).sum::<f64>() - 6.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_seed_same_values() {
        let mut a = Signal::temperature(60.0, 7);
        let mut b = Signal::temperature(60.0, 7);
        for i in 0..100 {
            let t = f64::from(i);
            assert_eq!(a.sample(t), b.sample(t));
        }
    }

    #[test]
    fn excursion_reaches_target_and_returns() {
        let mut s = Signal::temperature(65.0, 1).with_fault(Fault {
            start_s: 10.0,
            duration_s: 40.0,
            kind: FaultKind::Excursion {
                target: 88.0,
                ramp_s: 3.0,
            },
        });
        let vals: Vec<f64> = (0..80).filter_map(|i| s.sample(f64::from(i))).collect();
        assert!(vals[..10].iter().all(|v| *v < 75.0));
        assert!(vals[14..50].iter().all(|v| *v > 80.0), "{vals:?}");
        assert!(vals[50..].iter().all(|v| *v < 75.0));
    }

    #[test]
    fn dropout_flatline_spike_drift() {
        let mut s = Signal::new(Profile::Constant(10.0), 0.0, 3)
            .with_fault(Fault {
                start_s: 1.0,
                duration_s: 1.0,
                kind: FaultKind::Dropout,
            })
            .with_fault(Fault {
                start_s: 3.0,
                duration_s: 1.0,
                kind: FaultKind::Spike { magnitude: 100.0 },
            })
            .with_fault(Fault {
                start_s: 5.0,
                duration_s: 10.0,
                kind: FaultKind::Drift { per_s: 1.0 },
            });
        assert_eq!(s.sample(0.0), Some(10.0));
        assert_eq!(s.sample(1.0), None);
        assert_eq!(s.sample(3.0), Some(110.0));
        assert_eq!(s.sample(3.5), Some(10.0));
        assert_eq!(s.sample(7.0), Some(12.0));
        let mut f = Signal::temperature(20.0, 9).with_fault(Fault {
            start_s: 2.0,
            duration_s: 5.0,
            kind: FaultKind::Flatline,
        });
        f.sample(0.0);
        let before = f.sample(1.0);
        assert_eq!(f.sample(2.0), before);
        assert_eq!(f.sample(6.0), before);
    }
}
