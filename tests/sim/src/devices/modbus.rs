//! A simulated Modbus TCP slave (or a Modbus TCP gateway with several units behind it) on a
//! real TCP socket on 127.0.0.1.
//!
//! Each unit has the four tables of a real slave, 65,536 entries each, all zero until a test
//! sets them ([`ModbusTcpSlave::set_registers`], [`ModbusTcpSlave::set_bits`]). The slave
//! answers functions 1 to 6, 15 and 16 as the protocol says, with exception 0x01 for any other
//! function, 0x02 for a range past the table or over the protocol's limits, and 0x0B (gateway
//! target failed to respond) for a unit it does not have. Per unit a test injects a
//! [`ModbusFault`]: an exception, silence, a slow answer, garbage bytes, a short answer, or an
//! answer to another transaction. [`ModbusTcpSlave::unplug`] closes the listener and every
//! connection; [`ModbusTcpSlave::replug`] listens again on the same port.
//!
//! The slave counts the requests of each unit and keeps the time of the last
//! [`MAX_RECORDED_REQUESTS`] of them, so a test can check a poll schedule.
//!
//! The decoding of the register layouts lives in the agent; the encoder here
//! ([`registers_of`]) is written apart from it, so a test compares two implementations.

use std::collections::{HashMap, VecDeque};
use std::io;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio::task::JoinHandle;

/// Request times kept per unit for [`ModbusTcpSlave::request_times`].
pub const MAX_RECORDED_REQUESTS: usize = 10_000;
/// Longest request the slave reads (the protocol's ADU limit is 260 bytes).
const MAX_ADU: usize = 260;

/// A fault a unit injects into its answers.
#[derive(Debug, Clone, PartialEq)]
pub enum ModbusFault {
    /// Answer every request with this exception code.
    Exception(u8),
    /// Read requests and never answer.
    Silence,
    /// Answer after this delay.
    Slow(Duration),
    /// Answer with bytes that are not a Modbus answer (a wrong protocol identifier).
    Garbage,
    /// Answer reads with one register or byte of bits fewer than asked for.
    Short,
    /// Answer with another transaction's identifier.
    WrongTransaction,
}

/// The four tables of one unit.
#[derive(Debug)]
struct Unit {
    holding: Vec<u16>,
    input: Vec<u16>,
    coils: Vec<bool>,
    discrete: Vec<bool>,
    fault: Option<ModbusFault>,
    requests: u64,
    times: VecDeque<Instant>,
    writes: Vec<(u8, u16, Vec<u16>)>,
}

impl Unit {
    fn new() -> Self {
        Self {
            holding: vec![0; 65_536],
            input: vec![0; 65_536],
            coils: vec![false; 65_536],
            discrete: vec![false; 65_536],
            fault: None,
            requests: 0,
            times: VecDeque::new(),
            writes: Vec::new(),
        }
    }
}

/// Which table a test sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Table {
    Holding,
    Input,
    Coil,
    DiscreteInput,
}

#[derive(Debug, Default)]
struct State {
    units: HashMap<u8, Unit>,
}

/// A Modbus TCP slave on 127.0.0.1 (see the module doc).
#[derive(Debug)]
pub struct ModbusTcpSlave {
    addr: SocketAddr,
    state: Arc<Mutex<State>>,
    server: Option<JoinHandle<()>>,
}

impl ModbusTcpSlave {
    /// Listens on a port the operating system picks, with units `units`.
    pub async fn start(units: &[u8]) -> io::Result<Self> {
        let listener = TcpListener::bind("127.0.0.1:0").await?;
        let addr = listener.local_addr()?;
        let mut state = State::default();
        for u in units {
            state.units.insert(*u, Unit::new());
        }
        let state = Arc::new(Mutex::new(state));
        let server = Some(tokio::spawn(serve(listener, state.clone())));
        Ok(Self {
            addr,
            state,
            server,
        })
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    pub fn port(&self) -> u16 {
        self.addr.port()
    }

    fn lock(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn with_unit<T>(&self, unit: u8, f: impl FnOnce(&mut Unit) -> T) -> T {
        let mut s = self.lock();
        f(s.units.get_mut(&unit).expect("no such unit"))
    }

    /// Sets registers from `address` on (holding or input).
    pub fn set_registers(&self, unit: u8, table: Table, address: u16, values: &[u16]) {
        self.with_unit(unit, |u| {
            let t = match table {
                Table::Holding => &mut u.holding,
                Table::Input => &mut u.input,
                _ => panic!("{table:?} holds bits"),
            };
            let a = usize::from(address);
            t[a..a + values.len()].copy_from_slice(values);
        })
    }

    /// Sets bits from `address` on (coils or discrete inputs).
    pub fn set_bits(&self, unit: u8, table: Table, address: u16, values: &[bool]) {
        self.with_unit(unit, |u| {
            let t = match table {
                Table::Coil => &mut u.coils,
                Table::DiscreteInput => &mut u.discrete,
                _ => panic!("{table:?} holds registers"),
            };
            let a = usize::from(address);
            t[a..a + values.len()].copy_from_slice(values);
        })
    }

    /// Holding registers as they are now.
    pub fn holding(&self, unit: u8, address: u16, count: u16) -> Vec<u16> {
        self.with_unit(unit, |u| {
            u.holding[usize::from(address)..usize::from(address) + usize::from(count)].to_vec()
        })
    }

    /// Injects `fault` into every answer of `unit` (`None`: answer normally again).
    pub fn set_fault(&self, unit: u8, fault: Option<ModbusFault>) {
        self.with_unit(unit, |u| u.fault = fault)
    }

    /// Requests `unit` received (answered or not).
    pub fn requests(&self, unit: u8) -> u64 {
        self.with_unit(unit, |u| u.requests)
    }

    /// When the last requests of `unit` arrived (at most [`MAX_RECORDED_REQUESTS`]).
    pub fn request_times(&self, unit: u8) -> Vec<Instant> {
        self.with_unit(unit, |u| u.times.iter().copied().collect())
    }

    /// Writes `unit` accepted: (function, address, values; coils as 0 or 1).
    pub fn writes(&self, unit: u8) -> Vec<(u8, u16, Vec<u16>)> {
        self.with_unit(unit, |u| u.writes.clone())
    }

    /// Closes the listener and every open connection: the bus is gone.
    pub fn unplug(&mut self) {
        if let Some(s) = self.server.take() {
            s.abort();
        }
    }

    /// Listens again on the same port.
    pub async fn replug(&mut self) -> io::Result<()> {
        self.unplug();
        let listener = TcpListener::bind(self.addr).await?;
        self.server = Some(tokio::spawn(serve(listener, self.state.clone())));
        Ok(())
    }
}

impl Drop for ModbusTcpSlave {
    fn drop(&mut self) {
        self.unplug();
    }
}

/// Accepts connections until aborted; the connections end with it.
async fn serve(listener: TcpListener, state: Arc<Mutex<State>>) {
    let mut conns = tokio::task::JoinSet::new();
    loop {
        match listener.accept().await {
            Ok((stream, _)) => {
                // Bounded by the tests: one or two connections per agent.
                conns.spawn(connection(stream, state.clone()));
            }
            Err(e) => {
                tracing::warn!(error = %e, "modbus slave: accept failed");
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        }
    }
}

async fn connection(mut stream: TcpStream, state: Arc<Mutex<State>>) {
    let mut buf = [0u8; MAX_ADU];
    loop {
        if stream.read_exact(&mut buf[..7]).await.is_err() {
            return;
        }
        let tid = u16::from_be_bytes([buf[0], buf[1]]);
        let len = usize::from(u16::from_be_bytes([buf[4], buf[5]]));
        let unit = buf[6];
        if !(2..=MAX_ADU - 6).contains(&len) {
            return;
        }
        if stream.read_exact(&mut buf[7..6 + len]).await.is_err() {
            return;
        }
        let pdu = buf[7..6 + len].to_vec();
        let (answer, fault) = {
            let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
            match s.units.get_mut(&unit) {
                None => (exception(pdu[0], 0x0b), None),
                Some(u) => {
                    u.requests += 1;
                    if u.times.len() == MAX_RECORDED_REQUESTS {
                        u.times.pop_front();
                    }
                    u.times.push_back(Instant::now());
                    let fault = u.fault.clone();
                    let answer = match &fault {
                        Some(ModbusFault::Exception(code)) => exception(pdu[0], *code),
                        _ => answer(u, &pdu),
                    };
                    (answer, fault)
                }
            }
        };
        let mut tid_out = tid;
        let mut pid = 0u16;
        let mut answer = answer;
        match fault {
            Some(ModbusFault::Silence) => continue,
            Some(ModbusFault::Slow(d)) => tokio::time::sleep(d).await,
            Some(ModbusFault::Garbage) => pid = 0xbeef,
            Some(ModbusFault::WrongTransaction) => tid_out = tid.wrapping_add(7),
            Some(ModbusFault::Short) if matches!(answer[0], 1..=4) && answer[1] > 0 => {
                let cut = if matches!(answer[0], 3 | 4) { 2 } else { 1 };
                answer[1] -= cut;
                answer.truncate(answer.len() - usize::from(cut));
            }
            _ => {}
        }
        let mut adu = Vec::with_capacity(7 + answer.len());
        adu.extend_from_slice(&tid_out.to_be_bytes());
        adu.extend_from_slice(&pid.to_be_bytes());
        adu.extend_from_slice(&(answer.len() as u16 + 1).to_be_bytes());
        adu.push(unit);
        adu.extend_from_slice(&answer);
        if stream.write_all(&adu).await.is_err() {
            return;
        }
    }
}

fn exception(function: u8, code: u8) -> Vec<u8> {
    vec![function | 0x80, code]
}

/// The answer PDU of a unit to a request PDU.
fn answer(u: &mut Unit, pdu: &[u8]) -> Vec<u8> {
    let f = pdu[0];
    let word = |i: usize| pdu.get(i..i + 2).map(|b| u16::from_be_bytes([b[0], b[1]]));
    let (Some(addr), Some(n)) = (word(1), word(3)) else {
        return exception(f, 0x03);
    };
    let (a, n_us) = (usize::from(addr), usize::from(n));
    match f {
        1 | 2 => {
            if n == 0 || n > 2000 || a + n_us > 65_536 {
                return exception(f, 0x02);
            }
            let t = if f == 1 { &u.coils } else { &u.discrete };
            let mut out = vec![f, n_us.div_ceil(8) as u8];
            for chunk in t[a..a + n_us].chunks(8) {
                out.push(
                    chunk
                        .iter()
                        .enumerate()
                        .fold(0u8, |b, (i, on)| b | (u8::from(*on) << i)),
                );
            }
            out
        }
        3 | 4 => {
            if n == 0 || n > 125 || a + n_us > 65_536 {
                return exception(f, 0x02);
            }
            let t = if f == 3 { &u.holding } else { &u.input };
            let mut out = vec![f, (2 * n_us) as u8];
            for r in &t[a..a + n_us] {
                out.extend_from_slice(&r.to_be_bytes());
            }
            out
        }
        5 => {
            let on = match n {
                0xff00 => true,
                0x0000 => false,
                _ => return exception(f, 0x03),
            };
            u.coils[a] = on;
            u.writes.push((f, addr, vec![u16::from(on)]));
            pdu[..5].to_vec()
        }
        6 => {
            u.holding[a] = n;
            u.writes.push((f, addr, vec![n]));
            pdu[..5].to_vec()
        }
        15 | 16 => {
            let bytes = pdu.get(6..).unwrap_or_default();
            let count_ok = if f == 15 {
                (1..=1968).contains(&n) && bytes.len() == n_us.div_ceil(8)
            } else {
                (1..=123).contains(&n) && bytes.len() == 2 * n_us
            };
            if !count_ok || a + n_us > 65_536 {
                return exception(f, 0x03);
            }
            let values: Vec<u16> = if f == 15 {
                (0..n_us)
                    .map(|i| u16::from(bytes[i / 8] >> (i % 8) & 1))
                    .collect()
            } else {
                bytes
                    .chunks(2)
                    .map(|c| u16::from_be_bytes([c[0], c[1]]))
                    .collect()
            };
            for (i, v) in values.iter().enumerate() {
                if f == 15 {
                    u.coils[a + i] = *v == 1;
                } else {
                    u.holding[a + i] = *v;
                }
            }
            u.writes.push((f, addr, values));
            pdu[..5].to_vec()
        }
        _ => exception(f, 0x01),
    }
}

/// The registers a device holds for a value whose bytes, most significant first, are
/// `bytes`: with `byte_swapped` the two bytes of each register are swapped, with
/// `word_swapped` the registers come least significant first.
pub fn registers_of(bytes: &[u8], byte_swapped: bool, word_swapped: bool) -> Vec<u16> {
    let mut regs: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let (hi, lo) = if byte_swapped {
                (c[1], c[0])
            } else {
                (c[0], c[1])
            };
            u16::from(hi) << 8 | u16::from(lo)
        })
        .collect();
    if word_swapped {
        regs.reverse();
    }
    regs
}
