//! Registers to readings, and command values to registers: the pure half of a Modbus source.
//! No I/O; no allocation on the read path.
//!
//! A value of `n` registers is turned into its `2n` bytes, most significant first, by taking
//! the registers in order (reversed with `word_order = "little"`) and each register's two
//! bytes high then low (swapped with `byte_order = "little"`); the bytes are then read as the
//! configured type, big-endian. The reading is `raw * scale + offset`.

use super::config::{Order, RegisterConfig, ValueType};

/// The raw value of `regs` (exactly `value_type.width()` registers) before scale and offset.
pub fn raw_value(value_type: ValueType, bit: u8, byte: Order, word: Order, regs: &[u16]) -> f64 {
    let mut bytes = [0u8; 8];
    let n = regs.len().min(4);
    for i in 0..n {
        let reg = match word {
            Order::Big => regs[i],
            Order::Little => regs[n - 1 - i],
        };
        let reg = match byte {
            Order::Big => reg,
            Order::Little => reg.swap_bytes(),
        };
        bytes[2 * i..2 * i + 2].copy_from_slice(&reg.to_be_bytes());
    }
    let b2 = [bytes[0], bytes[1]];
    let b4 = [bytes[0], bytes[1], bytes[2], bytes[3]];
    match value_type {
        ValueType::U16 => f64::from(u16::from_be_bytes(b2)),
        ValueType::I16 => f64::from(i16::from_be_bytes(b2)),
        ValueType::U32 => f64::from(u32::from_be_bytes(b4)),
        ValueType::I32 => f64::from(i32::from_be_bytes(b4)),
        ValueType::F32 => f64::from(f32::from_be_bytes(b4)),
        ValueType::U64 => u64::from_be_bytes(bytes) as f64,
        ValueType::I64 => i64::from_be_bytes(bytes) as f64,
        ValueType::F64 => f64::from_be_bytes(bytes),
        // The bit counts in the register as the slave sends it (byte order does not move it).
        ValueType::Bit => f64::from(regs.first().is_some_and(|r| r >> (bit & 15) & 1 == 1)),
        ValueType::Bool => f64::from(regs.first().is_some_and(|r| *r != 0)),
    }
}

/// The reading for register map entry `r`, given the registers it spans.
pub fn register_reading(r: &RegisterConfig, regs: &[u16]) -> f64 {
    let raw = raw_value(
        r.value_type(),
        r.bit.unwrap_or(0),
        r.byte_order,
        r.word_order,
        regs,
    );
    raw * r.scale + r.offset
}

/// The reading for a coil or discrete input entry `r`.
pub fn bit_reading(r: &RegisterConfig, on: bool) -> f64 {
    f64::from(on) * r.scale + r.offset
}

/// What a write puts on the bus.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum WriteValue {
    /// Holding registers from the entry's address (function 6 for one, 16 for more).
    Registers(Vec<u16>),
    /// A coil (function 5).
    Coil(bool),
}

/// The registers (or coil) that hold `value` for register map entry `r`: the reading's
/// inverse, `(value - offset) / scale` in the entry's type (integers rounded to the nearest),
/// byte and word order. `Err` says why the value does not fit.
pub fn write_value(r: &RegisterConfig, value: f64) -> Result<WriteValue, String> {
    let raw = (value - r.offset) / r.scale;
    if !raw.is_finite() {
        return Err(format!("{value} gives no finite raw value"));
    }
    let t = r.value_type();
    if t == ValueType::Bool {
        return Ok(WriteValue::Coil(raw != 0.0));
    }
    let int = |min: f64, max: f64| {
        let v = raw.round();
        if v < min || v > max {
            Err(format!("{value} is {v} raw, outside {t:?}'s {min}..={max}"))
        } else {
            Ok(v)
        }
    };
    let bytes: Vec<u8> = match t {
        ValueType::U16 => (int(0.0, 65_535.0)? as u16).to_be_bytes().to_vec(),
        ValueType::I16 => (int(-32_768.0, 32_767.0)? as i16).to_be_bytes().to_vec(),
        ValueType::U32 => (int(0.0, 4_294_967_295.0)? as u32).to_be_bytes().to_vec(),
        ValueType::I32 => (int(-2_147_483_648.0, 2_147_483_647.0)? as i32)
            .to_be_bytes()
            .to_vec(),
        ValueType::U64 => (int(0.0, 18_446_744_073_709_549_568.0)? as u64)
            .to_be_bytes()
            .to_vec(),
        ValueType::I64 => (int(-9_223_372_036_854_775_808.0, 9_223_372_036_854_774_784.0)? as i64)
            .to_be_bytes()
            .to_vec(),
        ValueType::F32 => {
            if raw.abs() > f64::from(f32::MAX) {
                return Err(format!("{value} is {raw} raw, outside f32's range"));
            }
            (raw as f32).to_be_bytes().to_vec()
        }
        ValueType::F64 => raw.to_be_bytes().to_vec(),
        ValueType::Bit | ValueType::Bool => {
            return Err("one bit of a register cannot be written alone".into())
        }
    };
    let mut regs: Vec<u16> = bytes
        .chunks(2)
        .map(|c| {
            let reg = u16::from_be_bytes([c[0], c[1]]);
            match r.byte_order {
                Order::Big => reg,
                Order::Little => reg.swap_bytes(),
            }
        })
        .collect();
    if r.word_order == Order::Little {
        regs.reverse();
    }
    Ok(WriteValue::Registers(regs))
}

#[cfg(test)]
mod tests {
    use super::*;
    use Order::{Big, Little};

    /// The registers a slave holds for `bytes` (most significant first) in each order: an
    /// encoder written apart from the decoder, so that a shared mistake cannot hide.
    fn encode(bytes: &[u8], byte: Order, word: Order) -> Vec<u16> {
        let mut regs: Vec<u16> = bytes
            .chunks(2)
            .map(|c| match byte {
                Big => u16::from(c[0]) << 8 | u16::from(c[1]),
                Little => u16::from(c[1]) << 8 | u16::from(c[0]),
            })
            .collect();
        if word == Little {
            regs.reverse();
        }
        regs
    }

    fn every_order(t: ValueType, bytes: &[u8], want: f64) {
        for byte in [Big, Little] {
            for word in [Big, Little] {
                let regs = encode(bytes, byte, word);
                let got = raw_value(t, 0, byte, word, &regs);
                assert_eq!(
                    got.to_bits(),
                    want.to_bits(),
                    "{t:?} {byte:?}/{word:?} {regs:04x?}"
                );
            }
        }
    }

    #[test]
    fn every_type_in_every_byte_and_word_order() {
        every_order(ValueType::U16, &0xfedcu16.to_be_bytes(), 65_244.0);
        every_order(ValueType::I16, &(-300i16).to_be_bytes(), -300.0);
        every_order(ValueType::U32, &4_000_000_000u32.to_be_bytes(), 4e9);
        every_order(ValueType::I32, &(-2_000_000_000i32).to_be_bytes(), -2e9);
        every_order(ValueType::F32, &230.5f32.to_be_bytes(), 230.5);
        every_order(ValueType::F32, &(-0.1f32).to_be_bytes(), f64::from(-0.1f32));
        every_order(
            ValueType::U64,
            &0x0012_3456_789a_bcdeu64.to_be_bytes(),
            0x0012_3456_789a_bcdeu64 as f64,
        );
        every_order(
            ValueType::I64,
            &(-1_234_567_890_123i64).to_be_bytes(),
            -1_234_567_890_123.0,
        );
        every_order(
            ValueType::F64,
            &(-12_345.678_9f64).to_be_bytes(),
            -12_345.678_9,
        );
    }

    #[test]
    fn the_named_orders_of_a_32_bit_value() {
        // 0xAABBCCDD as the four layouts devices use: ABCD, CDAB, BADC, DCBA.
        let v = f64::from(0xaabb_ccddu32);
        let t = ValueType::U32;
        assert_eq!(raw_value(t, 0, Big, Big, &[0xaabb, 0xccdd]), v);
        assert_eq!(raw_value(t, 0, Big, Little, &[0xccdd, 0xaabb]), v);
        assert_eq!(raw_value(t, 0, Little, Big, &[0xbbaa, 0xddcc]), v);
        assert_eq!(raw_value(t, 0, Little, Little, &[0xddcc, 0xbbaa]), v);
    }

    #[test]
    fn bits_of_a_register_and_booleans() {
        let reg = [0b1000_0000_0000_0101u16];
        let bit = |n| raw_value(ValueType::Bit, n, Big, Big, &reg);
        assert_eq!((bit(0), bit(1), bit(2), bit(15)), (1.0, 0.0, 1.0, 1.0));
        // Byte order describes multi-byte values; a bit number is the register's own.
        assert_eq!(raw_value(ValueType::Bit, 15, Little, Big, &reg), 1.0);
        assert_eq!(raw_value(ValueType::Bool, 0, Big, Big, &[0]), 0.0);
        assert_eq!(raw_value(ValueType::Bool, 0, Big, Big, &[1]), 1.0);
    }

    #[test]
    fn a_written_value_reads_back_as_itself_in_every_type_and_order() {
        for t in ["u16", "i16", "u32", "i32", "u64", "i64", "f32", "f64"] {
            for (byte, word) in [
                ("big", "big"),
                ("big", "little"),
                ("little", "big"),
                ("little", "little"),
            ] {
                let r: RegisterConfig = toml::from_str(&format!(
                    "metric = \"m\"\nfunction = \"holding\"\naddress = 0\ntype = \"{t}\"\nbyte_order = \"{byte}\"\nword_order = \"{word}\"\nscale = 0.5\noffset = 10.0\n"
                ))
                .unwrap();
                let Ok(WriteValue::Registers(regs)) = write_value(&r, 70.5) else {
                    panic!("{t}");
                };
                assert_eq!(regs.len(), usize::from(r.value_type().width()));
                assert_eq!(register_reading(&r, &regs), 70.5, "{t} {byte}/{word}");
            }
        }
        let r: RegisterConfig =
            toml::from_str("metric = \"m\"\nfunction = \"holding\"\naddress = 0\ntype = \"u16\"\n")
                .unwrap();
        assert!(write_value(&r, 65_536.0).is_err());
        assert!(write_value(&r, -1.0).is_err());
        assert_eq!(write_value(&r, 1.4), Ok(WriteValue::Registers(vec![1])));
        let c: RegisterConfig =
            toml::from_str("metric = \"on\"\nfunction = \"coil\"\naddress = 3\n").unwrap();
        assert_eq!(write_value(&c, 1.0), Ok(WriteValue::Coil(true)));
        assert_eq!(write_value(&c, 0.0), Ok(WriteValue::Coil(false)));
    }

    #[test]
    fn scale_and_offset() {
        let r: RegisterConfig = toml::from_str(
            "metric = \"t\"\nfunction = \"input\"\naddress = 0\ntype = \"i16\"\nscale = 0.1\noffset = -40.0\n",
        )
        .unwrap();
        assert!((register_reading(&r, &[(-5i16) as u16]) - -40.5).abs() < 1e-9);
        assert!((register_reading(&r, &[650]) - 25.0).abs() < 1e-9);
        let c: RegisterConfig =
            toml::from_str("metric = \"on\"\nfunction = \"coil\"\naddress = 3\nscale = 5.0\n")
                .unwrap();
        assert_eq!((bit_reading(&c, true), bit_reading(&c, false)), (5.0, 0.0));
    }
}
