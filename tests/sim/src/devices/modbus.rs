//! Simulated Modbus slaves: [`ModbusTcpSlave`], a slave (or a Modbus TCP gateway with
//! several units behind it) on a real TCP socket on 127.0.0.1, and [`ModbusRtuSlave`], the
//! slaves of one RS-485 bus on a real pseudo-terminal.
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
    /// RTU: answer with the CRC's bytes flipped.
    BadCrc,
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
    /// Answer with another transaction's identifier (TCP) or another unit's address (RTU).
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
    /// Tasks that move registers along signals ([`ModbusTcpSlave::drive`]).
    drivers: Vec<JoinHandle<()>>,
}

impl ModbusTcpSlave {
    /// Listens on a port the operating system picks, with units `units`.
    pub async fn start(units: &[u8]) -> io::Result<Self> {
        Self::start_on(0, units).await
    }

    /// Listens on 127.0.0.1:`port` (0: a port the operating system picks).
    pub async fn start_on(port: u16, units: &[u8]) -> io::Result<Self> {
        let listener = TcpListener::bind(("127.0.0.1", port)).await?;
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
            drivers: Vec::new(),
        })
    }

    /// Moves holding or input registers from `address` along `signal`, sampled every
    /// `period` (its time in seconds since this call) and written as `encode` lays the value
    /// out, like a meter's measurement; a dropout (`None`) leaves the last value. Runs until
    /// the slave is dropped.
    pub fn drive(
        &mut self,
        unit: u8,
        table: Table,
        address: u16,
        mut signal: crate::signal::Signal,
        encode: fn(f64) -> Vec<u16>,
        period: Duration,
    ) {
        let state = self.state.clone();
        let started = Instant::now();
        self.drivers.push(tokio::spawn(async move {
            let mut tick = tokio::time::interval(period);
            loop {
                tick.tick().await;
                let Some(v) = signal.sample(started.elapsed().as_secs_f64()) else {
                    continue;
                };
                let regs = encode(v);
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                let Some(u) = s.units.get_mut(&unit) else {
                    return;
                };
                let t = match table {
                    Table::Input => &mut u.input,
                    _ => &mut u.holding,
                };
                let a = usize::from(address);
                if let Some(dst) = t.get_mut(a..a + regs.len()) {
                    dst.copy_from_slice(&regs);
                }
            }
        }));
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
        for d in &self.drivers {
            d.abort();
        }
    }
}

/// A simulated energy meter on 127.0.0.1:`port` (0: any free port), unit 1: voltage and
/// power in input registers 0-1 and 2-3 as word-swapped f32, following signals with noise
/// (sampled every 200 ms). What `edgestream demo` polls and `edgestream simulate
/// --modbus-port` serves.
pub async fn energy_meter(port: u16) -> io::Result<ModbusTcpSlave> {
    use crate::signal::{Profile, Signal};
    let mut meter = ModbusTcpSlave::start_on(port, &[1]).await?;
    let every = Duration::from_millis(200);
    let voltage = Signal::new(Profile::Constant(230.0), 1.5, 11);
    let power = Signal::new(Profile::Constant(1800.0), 120.0, 12);
    meter.drive(1, Table::Input, 0, voltage, f32_word_swapped, every);
    meter.drive(1, Table::Input, 2, power, f32_word_swapped, every);
    Ok(meter)
}

/// An `f32` in two registers, low word first: how many energy meters lay out their
/// measurements.
pub fn f32_word_swapped(v: f64) -> Vec<u16> {
    registers_of(&(v as f32).to_be_bytes(), false, true)
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

/// Most bytes of an RTU frame.
const MAX_RTU_FRAME: usize = 256;
/// Inter-frame gaps kept for [`ModbusRtuSlave::gaps`].
pub const MAX_RECORDED_GAPS: usize = 100_000;

/// CRC-16/MODBUS, written apart from the agent's.
pub fn rtu_crc(bytes: &[u8]) -> u16 {
    let mut crc: u16 = 0xffff;
    for &b in bytes {
        crc ^= u16::from(b);
        for _ in 0..8 {
            let lsb = crc & 1;
            crc >>= 1;
            if lsb == 1 {
                crc ^= 0xa001;
            }
        }
    }
    crc
}

#[derive(Debug, Default)]
struct RtuBus {
    /// The pty master while plugged.
    master: Option<serialport::TTYPort>,
    /// Silence before each request, from the end of the frame before it (for an answer, the
    /// start of its write: the agent cannot see it sooner).
    gaps: Vec<Duration>,
    /// Requests dropped for a wrong CRC or an unknown length.
    bad_requests: u64,
    /// Emulate the wire at this speed (10 bits a character): see [`ModbusRtuSlave::set_line_speed`].
    baud: Option<u32>,
}

/// The slaves of one RS-485 bus on a real pseudo-terminal: the agent opens
/// [`ModbusRtuSlave::path`], a `by-id` style link to the pty, as it would open an adapter.
///
/// Frames are cut as an RTU slave cuts them: by their length, and a partial frame is dropped
/// after a silence (a read that times out). A request with a wrong CRC, or for a unit the bus
/// does not have, is not answered. The bus records the silence before each request, from the
/// end of the frame before it (a request or an answer), so a test can check the
/// inter-frame gap the master keeps. [`ModbusRtuSlave::unplug`] closes the pty (the agent's
/// reads fail), [`ModbusRtuSlave::replug`] opens a new one behind the same link.
#[derive(Debug)]
pub struct ModbusRtuSlave {
    state: Arc<Mutex<State>>,
    bus: Arc<Mutex<RtuBus>>,
    link: std::path::PathBuf,
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
    _dir: tempfile::TempDir,
}

impl ModbusRtuSlave {
    /// A bus with units `units` on a new pty.
    pub fn start(units: &[u8]) -> io::Result<Self> {
        let dir = tempfile::Builder::new()
            .prefix("edgestream-modbus-")
            .tempdir()?;
        let by_id = dir.path().join("by-id");
        std::fs::create_dir(&by_id)?;
        let link = by_id.join("usb-edgestream_sim_rs485-if00-port0");
        let (master, pty) = super::serial::open_pty().map_err(io::Error::other)?;
        super::serial::point_link(&link, &pty)?;
        let mut state = State::default();
        for u in units {
            state.units.insert(*u, Unit::new());
        }
        let state = Arc::new(Mutex::new(state));
        let bus = Arc::new(Mutex::new(RtuBus {
            master: Some(master),
            ..RtuBus::default()
        }));
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let thread = {
            let (state, bus, stop) = (state.clone(), bus.clone(), stop.clone());
            std::thread::Builder::new()
                .name("modbus-rtu-sim".into())
                .spawn(move || serve_rtu(state, bus, stop))?
        };
        Ok(Self {
            state,
            bus,
            link,
            stop,
            thread: Some(thread),
            _dir: dir,
        })
    }

    /// The stable path for the agent (a link to the current pty).
    pub fn path(&self) -> &std::path::Path {
        &self.link
    }

    fn with_unit<T>(&self, unit: u8, f: impl FnOnce(&mut Unit) -> T) -> T {
        let mut s = self.state.lock().unwrap_or_else(|e| e.into_inner());
        f(s.units.get_mut(&unit).expect("no such unit"))
    }

    fn bus(&self) -> MutexGuard<'_, RtuBus> {
        self.bus.lock().unwrap_or_else(|e| e.into_inner())
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

    /// Injects `fault` into every answer of `unit` (`None`: answer normally again).
    pub fn set_fault(&self, unit: u8, fault: Option<ModbusFault>) {
        self.with_unit(unit, |u| u.fault = fault)
    }

    /// Requests `unit` received with a good CRC (answered or not).
    pub fn requests(&self, unit: u8) -> u64 {
        self.with_unit(unit, |u| u.requests)
    }

    /// When the last requests of `unit` arrived.
    pub fn request_times(&self, unit: u8) -> Vec<Instant> {
        self.with_unit(unit, |u| u.times.iter().copied().collect())
    }

    /// The silence before each request so far.
    pub fn gaps(&self) -> Vec<Duration> {
        self.bus().gaps.clone()
    }

    /// Requests dropped for a wrong CRC or an unknown function.
    pub fn bad_requests(&self) -> u64 {
        self.bus().bad_requests
    }

    /// Emulates a line at `baud` (10 bits a character): each answer is written when the
    /// request, the silence that ends it (3.5 characters, 1.75 ms above 19,200 baud) and the
    /// answer would have taken that long on the wire. `None`: answer at once.
    pub fn set_line_speed(&self, baud: Option<u32>) {
        self.bus().baud = baud;
    }

    /// Closes the pty: the agent's reads and writes fail.
    pub fn unplug(&self) {
        self.bus().master = None;
    }

    /// Opens a new pty behind the same link.
    pub fn replug(&self) -> io::Result<()> {
        let (master, pty) = super::serial::open_pty().map_err(io::Error::other)?;
        super::serial::point_link(&self.link, &pty)?;
        self.bus().master = Some(master);
        Ok(())
    }
}

impl Drop for ModbusRtuSlave {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            // The thread wakes every few milliseconds; a panic in it is already reported.
            if t.join().is_err() {
                tracing::warn!("modbus rtu slave thread panicked");
            }
        }
    }
}

/// Length of the request frame that starts `buf`, if its function is known.
fn rtu_request_len(buf: &[u8]) -> Option<usize> {
    match *buf.get(1)? {
        1..=6 => Some(8),
        15 | 16 => Some(9 + usize::from(*buf.get(6)?)),
        _ => None,
    }
}

fn serve_rtu(
    state: Arc<Mutex<State>>,
    bus: Arc<Mutex<RtuBus>>,
    stop: Arc<std::sync::atomic::AtomicBool>,
) {
    use std::io::{Read, Write};
    let mut buf: Vec<u8> = Vec::with_capacity(MAX_RTU_FRAME);
    let mut chunk = [0u8; MAX_RTU_FRAME];
    let mut frame_start: Option<Instant> = None;
    let mut last_frame_end: Option<Instant> = None;
    while !stop.load(std::sync::atomic::Ordering::Relaxed) {
        let mut guard = bus.lock().unwrap_or_else(|e| e.into_inner());
        let RtuBus {
            master,
            gaps,
            bad_requests,
            baud,
        } = &mut *guard;
        let Some(master) = master.as_mut() else {
            drop(guard);
            buf.clear();
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        let n = match master.read(&mut chunk) {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::TimedOut => {
                // Silence: a partial frame is over.
                buf.clear();
                frame_start = None;
                drop(guard);
                // Let the test thread take the lock between reads.
                std::thread::yield_now();
                continue;
            }
            Err(_) => {
                drop(guard);
                std::thread::sleep(Duration::from_millis(5));
                continue;
            }
        };
        let now = Instant::now();
        if buf.is_empty() && n > 0 {
            frame_start = Some(now);
        }
        buf.extend_from_slice(&chunk[..n]);
        while let Some(len) = rtu_request_len(&buf) {
            if buf.len() < len {
                break;
            }
            let frame: Vec<u8> = buf.drain(..len).collect();
            let start = frame_start.take().unwrap_or(now);
            if let Some(end) = last_frame_end {
                if gaps.len() < MAX_RECORDED_GAPS {
                    gaps.push(start.saturating_duration_since(end));
                }
            }
            last_frame_end = Some(now);
            if rtu_crc(&frame[..len - 2]) != u16::from_le_bytes([frame[len - 2], frame[len - 1]]) {
                *bad_requests += 1;
                continue;
            }
            let unit = frame[0];
            let pdu = &frame[1..len - 2];
            let (answer, fault) = {
                let mut s = state.lock().unwrap_or_else(|e| e.into_inner());
                let Some(u) = s.units.get_mut(&unit) else {
                    continue;
                };
                u.requests += 1;
                if u.times.len() == MAX_RECORDED_REQUESTS {
                    u.times.pop_front();
                }
                u.times.push_back(now);
                let fault = u.fault.clone();
                let a = match &fault {
                    Some(ModbusFault::Exception(code)) => exception(pdu[0], *code),
                    _ => answer(u, pdu),
                };
                (a, fault)
            };
            let mut answer = answer;
            let mut unit_out = unit;
            match &fault {
                Some(ModbusFault::Silence) => continue,
                Some(ModbusFault::Slow(d)) => std::thread::sleep(*d),
                Some(ModbusFault::Short) if matches!(answer[0], 1..=4) && answer[1] > 0 => {
                    let cut = if matches!(answer[0], 3 | 4) { 2 } else { 1 };
                    answer[1] -= cut;
                    answer.truncate(answer.len() - usize::from(cut));
                }
                Some(ModbusFault::WrongTransaction) => unit_out = unit.wrapping_add(1),
                _ => {}
            }
            let mut out = Vec::with_capacity(answer.len() + 3);
            out.push(unit_out);
            out.extend_from_slice(&answer);
            let crc = rtu_crc(&out);
            out.extend_from_slice(&crc.to_le_bytes());
            match &fault {
                Some(ModbusFault::BadCrc) => {
                    let n = out.len();
                    out[n - 1] ^= 0xff;
                    out[n - 2] ^= 0xff;
                }
                Some(ModbusFault::Garbage) => {
                    out = vec![0xff, 0x00, 0x13, 0x37, 0xff, 0xfe, 0x00, 0x42];
                }
                _ => {}
            }
            if let Some(baud) = *baud {
                let character = Duration::from_nanos(10_000_000_000 / u64::from(baud.max(1)));
                let silence = if baud > 19_200 {
                    Duration::from_micros(1_750)
                } else {
                    character * 7 / 2
                };
                let wire = character * (len + out.len()) as u32 + silence;
                let due = start + wire;
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            // The answer's end is taken before the write: the agent may read it as soon as
            // the write starts, and this thread may be descheduled before the write returns,
            // so a time taken after it could be later than the agent's and make the silence
            // before the next request look shorter than it was.
            last_frame_end = Some(Instant::now());
            if master
                .write_all(&out)
                .and_then(|()| master.flush())
                .is_err()
            {
                break;
            }
        }
        if buf.len() > MAX_RTU_FRAME || (buf.len() >= 2 && rtu_request_len(&buf).is_none()) {
            *bad_requests += 1;
            buf.clear();
        }
    }
}
