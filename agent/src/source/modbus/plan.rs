//! Which requests poll a bus: the register maps of its slaves grouped into reads. No I/O.
//!
//! Values of one slave, one table (function) and one poll interval are read together when
//! they are adjacent, or at most `max_gap` unread registers (bits) apart, and the read stays
//! within the protocol's limit ([`ModbusFunction::max_read`]: 125 registers, 2000 bits).
//! Values with different intervals are never merged: each request keeps its own schedule.

use std::time::Duration;

use super::config::{ModbusConfig, ModbusFunction};

/// One request of the poll plan.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ReadRequest {
    /// Index of the slave in the bus's `slaves`.
    pub slave: usize,
    pub function: ModbusFunction,
    pub start: u16,
    pub count: u16,
    pub interval: Duration,
    /// Indexes, in the slave's `registers`, of the values this read carries.
    pub values: Vec<usize>,
}

/// The reads that poll every value of every slave on `bus` (a validated config).
pub fn plan_reads(bus: &ModbusConfig) -> Vec<ReadRequest> {
    let mut reads = Vec::new();
    for (s, slave) in bus.slaves.iter().enumerate() {
        let mut order: Vec<usize> = (0..slave.registers.len()).collect();
        order.sort_by_key(|&i| {
            let r = &slave.registers[i];
            (r.function, r.interval_ms, r.address)
        });
        let mut current: Option<(ReadRequest, u32)> = None;
        for i in order {
            let r = &slave.registers[i];
            let start = r.address;
            let end = start + u32::from(r.value_type().width());
            if let Some((req, req_end)) = &mut current {
                let same = req.function == r.function
                    && req.interval == Duration::from_millis(r.interval_ms);
                let near = start <= *req_end + u32::from(bus.max_gap);
                let new_end = (*req_end).max(end);
                let fits = new_end - u32::from(req.start) <= u32::from(r.function.max_read());
                if same && near && fits {
                    *req_end = new_end;
                    req.count = (new_end - u32::from(req.start)) as u16;
                    req.values.push(i);
                    continue;
                }
            }
            if let Some((req, _)) = current.take() {
                reads.push(req);
            }
            current = Some((
                ReadRequest {
                    slave: s,
                    function: r.function,
                    start: start as u16,
                    count: (end - start) as u16,
                    interval: Duration::from_millis(r.interval_ms),
                    values: vec![i],
                },
                end,
            ));
        }
        if let Some((req, _)) = current {
            reads.push(req);
        }
    }
    reads
}

#[cfg(test)]
mod tests {
    use super::*;

    fn bus(max_gap: u16, registers: &str) -> ModbusConfig {
        let text = format!(
            "transport = \"tcp\"\nhost = \"h\"\nmax_gap = {max_gap}\n[[slaves]]\nunit = 1\ndevice = \"d\"\n{registers}"
        );
        toml::from_str(&text).unwrap()
    }

    fn reg(metric: &str, function: &str, address: u32, t: &str, interval: u64) -> String {
        format!(
            "[[slaves.registers]]\nmetric = \"{metric}\"\nfunction = \"{function}\"\naddress = {address}\ntype = \"{t}\"\ninterval_ms = {interval}\n"
        )
    }

    fn spans(reads: &[ReadRequest]) -> Vec<(ModbusFunction, u16, u16, Vec<usize>)> {
        reads
            .iter()
            .map(|r| (r.function, r.start, r.count, r.values.clone()))
            .collect()
    }

    #[test]
    fn adjacent_values_share_a_read_and_gaps_split_it() {
        let regs = [
            reg("a", "holding", 0, "f32", 1000),
            reg("b", "holding", 2, "u16", 1000),
            reg("c", "holding", 5, "u32", 1000), // 2 unread registers after b
            reg("d", "holding", 3, "u16", 500),  // other interval
            reg("e", "input", 3, "u16", 1000),   // other table
        ]
        .concat();
        use ModbusFunction::*;
        assert_eq!(
            spans(&plan_reads(&bus(0, &regs))),
            vec![
                (Holding, 3, 1, vec![3]),
                (Holding, 0, 3, vec![0, 1]),
                (Holding, 5, 2, vec![2]),
                (Input, 3, 1, vec![4]),
            ]
        );
        assert_eq!(
            spans(&plan_reads(&bus(2, &regs)))[1],
            (Holding, 0, 7, vec![0, 1, 2]),
            "max_gap = 2 reads the two unused registers instead of a second request"
        );
    }

    #[test]
    fn reads_stay_within_the_protocols_limits() {
        // 130 adjacent u16 registers: 125 + 5.
        let regs: String = (0..130)
            .map(|a| reg(&format!("r{a}"), "input", a, "u16", 1000))
            .collect();
        let reads = plan_reads(&bus(0, &regs));
        assert_eq!(
            reads.iter().map(|r| (r.start, r.count)).collect::<Vec<_>>(),
            vec![(0, 125), (125, 5)]
        );
        // 63 f32 values: 62 fit in 124 registers, the 63rd would make 126.
        let regs: String = (0..63)
            .map(|a| reg(&format!("f{a}"), "holding", 2 * a, "f32", 1000))
            .collect();
        let reads = plan_reads(&bus(0, &regs));
        assert_eq!(
            reads.iter().map(|r| (r.start, r.count)).collect::<Vec<_>>(),
            vec![(0, 124), (124, 2)]
        );
        // Coils: 2000 per read.
        let regs: String = [0, 1999, 2000]
            .iter()
            .map(|&a| reg(&format!("c{a}"), "coil", a, "bool", 1000))
            .collect();
        let reads = plan_reads(&bus(125, &regs));
        assert_eq!(
            reads.iter().map(|r| (r.start, r.count)).collect::<Vec<_>>(),
            vec![(0, 1), (1999, 2)],
            "gap 1998 is over max_gap; 1999 and 2000 fit one read"
        );
    }

    #[test]
    fn bits_of_one_register_share_it() {
        let regs = format!(
            "{}bit = 0\n{}bit = 7\n",
            reg("alarm", "holding", 10, "bit", 1000),
            reg("ready", "holding", 10, "bit", 1000)
        );
        assert_eq!(
            spans(&plan_reads(&bus(0, &regs))),
            vec![(ModbusFunction::Holding, 10, 1, vec![0, 1])]
        );
    }
}
