//! Element types of safetensors files and how we read them.

use std::fmt;

/// The safetensors dtypes rlmask reads. Anything else in a header is rejected by name.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Dtype {
    Bool,
    U8,
    I8,
    U16,
    I16,
    U32,
    I32,
    U64,
    I64,
    F16,
    BF16,
    F32,
    F64,
    F8E4M3,
    F8E5M2,
    /// AMD's FP8 variants (MI300-trained checkpoints): exponent biases 8 and 16, one NaN
    /// (0x80), no negative zero, no infinities.
    F8E4M3Fnuz,
    F8E5M2Fnuz,
    /// OCP MX's E8M0 scale: `2^(code - 127)`, 0xFF NaN (MXFP4 block scales).
    F8E8M0,
    /// OCP MX's FP4 E2M1, two elements per byte, the first in the low nibble (MXFP4 codes).
    F4,
}

impl Dtype {
    /// Every dtype, in a fixed order (used for error messages and tests).
    pub const ALL: [Dtype; 19] = [
        Dtype::Bool,
        Dtype::U8,
        Dtype::I8,
        Dtype::U16,
        Dtype::I16,
        Dtype::U32,
        Dtype::I32,
        Dtype::U64,
        Dtype::I64,
        Dtype::F16,
        Dtype::BF16,
        Dtype::F32,
        Dtype::F64,
        Dtype::F8E4M3,
        Dtype::F8E5M2,
        Dtype::F8E4M3Fnuz,
        Dtype::F8E5M2Fnuz,
        Dtype::F8E8M0,
        Dtype::F4,
    ];

    /// The name used in safetensors headers.
    pub fn name(self) -> &'static str {
        match self {
            Dtype::Bool => "BOOL",
            Dtype::U8 => "U8",
            Dtype::I8 => "I8",
            Dtype::U16 => "U16",
            Dtype::I16 => "I16",
            Dtype::U32 => "U32",
            Dtype::I32 => "I32",
            Dtype::U64 => "U64",
            Dtype::I64 => "I64",
            Dtype::F16 => "F16",
            Dtype::BF16 => "BF16",
            Dtype::F32 => "F32",
            Dtype::F64 => "F64",
            Dtype::F8E4M3 => "F8_E4M3",
            Dtype::F8E5M2 => "F8_E5M2",
            Dtype::F8E4M3Fnuz => "F8_E4M3FNUZ",
            Dtype::F8E5M2Fnuz => "F8_E5M2FNUZ",
            Dtype::F8E8M0 => "F8_E8M0",
            Dtype::F4 => "F4",
        }
    }

    /// Parses a safetensors dtype name; `None` for names we do not read.
    pub fn parse(name: &str) -> Option<Dtype> {
        Dtype::ALL.into_iter().find(|d| d.name() == name)
    }

    /// Bytes per element; for F4, which packs two elements in a byte, the byte that holds
    /// them: slices of data that may be F4 are measured with [`Dtype::bytes`].
    pub fn size(self) -> usize {
        match self {
            Dtype::Bool | Dtype::U8 | Dtype::I8 | Dtype::F8E8M0 | Dtype::F4 => 1,
            Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E4M3Fnuz | Dtype::F8E5M2Fnuz => 1,
            Dtype::U16 | Dtype::I16 | Dtype::F16 | Dtype::BF16 => 2,
            Dtype::U32 | Dtype::I32 | Dtype::F32 => 4,
            Dtype::U64 | Dtype::I64 | Dtype::F64 => 8,
        }
    }

    /// Bits per element.
    pub fn bits(self) -> u64 {
        if self == Dtype::F4 {
            4
        } else {
            8 * self.size() as u64
        }
    }

    /// Bytes holding `n` elements, `n` even for F4 (a tensor's F4 elements pair up in bytes,
    /// and every stretch of one starts at an even element).
    pub fn bytes(self, n: usize) -> usize {
        if self == Dtype::F4 {
            n / 2
        } else {
            n * self.size()
        }
    }

    /// Floating dtypes are compared by value; the others bit for bit.
    pub fn is_float(self) -> bool {
        matches!(
            self,
            Dtype::F16 | Dtype::BF16 | Dtype::F32 | Dtype::F64 | Dtype::F8E8M0 | Dtype::F4
        ) || self.is_fp8()
    }

    /// The four one-byte floating formats (OCP E4M3 and E5M2, AMD's FNUZ variants).
    pub fn is_fp8(self) -> bool {
        matches!(
            self,
            Dtype::F8E4M3 | Dtype::F8E5M2 | Dtype::F8E4M3Fnuz | Dtype::F8E5M2Fnuz
        )
    }
}

impl fmt::Display for Dtype {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.name())
    }
}

/// Widening of the narrow floating formats to f32 bit patterns, exact and injective (distinct
/// inputs, NaN payloads included, give distinct outputs), so "same bits before widening" and
/// "same bits after widening" mean the same thing.
pub(crate) mod widen {
    use std::sync::OnceLock;

    /// bf16 is the top half of an f32.
    #[inline(always)]
    pub fn bf16(h: u16) -> u32 {
        (h as u32) << 16
    }

    /// An f32 bit pattern rounded to BF16: to nearest, ties to even (a carry into the
    /// exponent gives the next binade, or infinity); a NaN stays a NaN, quieted.
    pub fn f32_to_bf16(x: u32) -> u16 {
        if x & 0x7fff_ffff > 0x7f80_0000 {
            return ((x >> 16) | 0x0040) as u16;
        }
        let lsb = (x >> 16) & 1;
        ((x + 0x7fff + lsb) >> 16) as u16
    }

    /// IEEE binary16 to binary32, computed (used to fill the table).
    pub fn f16_compute(h: u16) -> u32 {
        let sign = ((h as u32) & 0x8000) << 16;
        let exp = ((h >> 10) & 0x1f) as u32;
        let man = (h & 0x3ff) as u32;
        match exp {
            0 if man == 0 => sign,
            0 => {
                // Subnormal: value = man * 2^-24; normalise into an f32.
                let shift = man.leading_zeros() - 21; // bring the top set bit to bit 10
                let man = (man << shift) & 0x3ff;
                let exp = 127 - 15 + 1 - shift;
                sign | (exp << 23) | (man << 13)
            }
            0x1f => sign | 0x7f80_0000 | (man << 13), // Inf and NaN, payload kept
            _ => sign | ((exp + 127 - 15) << 23) | (man << 13),
        }
    }

    /// The exact f32 value of an FP8 code (E5M2 when `E5M2`, else E4M3), bit for bit the widening
    /// computed without a table and without subnormal intermediates
    /// (which cost microcode assists on some CPUs): a normal code's exponent and mantissa are
    /// placed into an f32 and rebiased; a subnormal `m * 2^-k` is `2^-k' * (1 + m') - 2^-k'` for
    /// the right `k'`, exact in f32; NaN and infinite codes get their widened patterns (payload
    /// kept); the sign goes on last. Straight-line code, so loops over it vectorise.
    #[inline(always)]
    pub fn fp8_value<const E5M2: bool>(c: u8) -> f32 {
        let (shift, bias, exp_mask, sub_exp) = if E5M2 {
            (21u32, 112u32, 0x7cu32, 113u32)
        } else {
            (20, 120, 0x78, 121)
        };
        let magnitude = c as u32 & 0x7f;
        let placed = magnitude << shift;
        let normal = placed + (bias << 23);
        let one = f32::from_bits(sub_exp << 23);
        let subnormal = (f32::from_bits(placed | (sub_exp << 23)) - one).to_bits();
        let (is_special, special) = if E5M2 {
            // Exponent all ones: infinity, or NaN with the mantissa as payload.
            (
                magnitude & 0x7c == 0x7c,
                0x7f80_0000 | ((magnitude & 3) << 21),
            )
        } else {
            // Only S.1111.111 is NaN; E4M3 has no infinity.
            (magnitude == 0x7f, 0x7fc0_0000)
        };
        let bits = if is_special {
            special
        } else if magnitude & exp_mask == 0 {
            subnormal
        } else {
            normal
        };
        f32::from_bits(bits | ((c as u32 & 0x80) << 24))
    }

    static F16_TABLE: OnceLock<Box<[u32]>> = OnceLock::new();
    static F8_TABLES: OnceLock<Box<[[u32; 256]; 5]>> = OnceLock::new();

    /// 65,536-entry table (256 KiB) for binary16.
    pub fn f16_table() -> &'static [u32] {
        F16_TABLE.get_or_init(|| (0..=u16::MAX).map(f16_compute).collect())
    }

    /// Tables for E4M3 (index 0), E5M2 (1), E4M3FNUZ (2), E5M2FNUZ (3) and E8M0 (4).
    pub fn f8_tables() -> &'static [[u32; 256]; 5] {
        F8_TABLES.get_or_init(|| {
            let mut t = Box::new([[0u32; 256]; 5]);
            for b in 0..=255u8 {
                t[0][b as usize] = fp8_value::<false>(b).to_bits();
                t[1][b as usize] = fp8_value::<true>(b).to_bits();
                t[2][b as usize] = fnuz_compute(b, 4, 8);
                t[3][b as usize] = fnuz_compute(b, 5, 16);
                t[4][b as usize] = e8m0_compute(b);
            }
            t
        })
    }

    /// The widening table of an FP8 dtype.
    pub fn f8_table(d: super::Dtype) -> &'static [u32; 256] {
        use super::Dtype;
        let i = match d {
            Dtype::F8E4M3 => 0,
            Dtype::F8E5M2 => 1,
            Dtype::F8E4M3Fnuz => 2,
            Dtype::F8E5M2Fnuz => 3,
            Dtype::F8E8M0 => 4,
            _ => unreachable!("{d} is not an FP8 dtype"),
        };
        &f8_tables()[i]
    }

    /// OCP MX's E8M0 scale to binary32: `2^(e - 127)`, exact (2^-127 is an f32 subnormal);
    /// 0xFF is NaN.
    pub fn e8m0_compute(e: u8) -> u32 {
        match e {
            0 => 0x0040_0000,
            0xff => 0x7fc0_0000,
            _ => (e as u32) << 23,
        }
    }

    /// OCP MX's FP4 E2M1 values of the 16 codes (bit 3 the sign): 0, 0.5, 1, 1.5, 2, 3, 4, 6.
    pub const F4_VALUES: [f32; 16] = [
        0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0, -0.0, -0.5, -1.0, -1.5, -2.0, -3.0, -4.0, -6.0,
    ];

    /// AMD's FNUZ FP8 (`exp_bits` exponent bits with bias `bias`, the rest mantissa) to
    /// binary32: 0x80 (what would be negative zero) is the one NaN; every other code is finite,
    /// the all-ones exponent included; exponent 0 is subnormal, `m * 2^(1 - bias - man_bits)`.
    pub fn fnuz_compute(b: u8, exp_bits: u32, bias: u32) -> u32 {
        if b == 0x80 {
            return 0x7fc0_0000;
        }
        let man_bits = 7 - exp_bits;
        let sign = ((b as u32) & 0x80) << 24;
        let exp = ((b as u32) >> man_bits) & ((1 << exp_bits) - 1);
        let man = (b as u32) & ((1 << man_bits) - 1);
        match exp {
            0 if man == 0 => sign,
            0 => {
                // Normalise: the top set bit of man becomes the implicit one.
                let top = 31 - man.leading_zeros(); // 0..man_bits-1
                let shift = man_bits - top;
                let man = (man << shift) & ((1 << man_bits) - 1);
                let exp = 127 + 1 - bias - shift;
                sign | (exp << 23) | (man << (23 - man_bits))
            }
            _ => sign | ((exp + 127 - bias) << 23) | (man << (23 - man_bits)),
        }
    }

    /// binary32 bits to binary64 bits, exact, keeping NaN payloads (a plain `as f64` may quiet
    /// a signalling NaN and so merge two distinct patterns).
    #[inline(always)]
    pub fn f32_to_f64_bits(x: u32) -> u64 {
        let f = f32::from_bits(x);
        if f.is_nan() {
            let sign = ((x >> 31) as u64) << 63;
            sign | (0x7ffu64 << 52) | (((x & 0x7f_ffff) as u64) << 29)
        } else {
            (f as f64).to_bits()
        }
    }
}

#[cfg(test)]
mod tests {
    use super::widen::*;
    use super::*;

    #[test]
    fn names_round_trip() {
        for d in Dtype::ALL {
            assert_eq!(Dtype::parse(d.name()), Some(d));
        }
        assert_eq!(Dtype::parse("F6_E2M3"), None);
        assert_eq!(Dtype::parse("bf16"), None);
    }

    /// binary16 reference values from the IEEE standard's examples.
    #[test]
    fn f16_known_values() {
        let cases: [(u16, f32); 9] = [
            (0x3c00, 1.0),
            (0xc000, -2.0),
            (0x7bff, 65504.0),
            (0x0400, 6.103_515_6e-5),
            (0x0001, 5.960_464_5e-8),
            (0x03ff, 6.097_555e-5),
            (0x3555, 0.333_251_95),
            (0x7c00, f32::INFINITY),
            (0xfc00, f32::NEG_INFINITY),
        ];
        for (h, want) in cases {
            assert_eq!(f32::from_bits(f16_compute(h)), want, "{h:#06x}");
        }
        assert_eq!(f16_compute(0x8000), 0x8000_0000);
        assert!(f32::from_bits(f16_compute(0x7e00)).is_nan());
    }

    fn e4m3(b: u8) -> u32 {
        fp8_value::<false>(b).to_bits()
    }

    fn e5m2(b: u8) -> u32 {
        fp8_value::<true>(b).to_bits()
    }

    /// OCP FP8 from its definition: E4M3 has bias 7, no infinities and one NaN per sign
    /// (S.1111.111); E5M2 is the top byte of an IEEE binary16, NaN payloads kept.
    #[test]
    fn f8_known_values() {
        // E4M3: max normal 448, min subnormal 2^-9, NaN at 0x7f.
        assert_eq!(f32::from_bits(e4m3(0x7e)), 448.0);
        assert_eq!(f32::from_bits(e4m3(0x01)), 2f32.powi(-9));
        assert_eq!(f32::from_bits(e4m3(0x38)), 1.0);
        assert!(f32::from_bits(e4m3(0x7f)).is_nan());
        assert!(f32::from_bits(e4m3(0xff)).is_nan());
        // E5M2: max 57344, Inf at 0x7c; every code as the binary16 it is the top byte of.
        assert_eq!(f32::from_bits(e5m2(0x7b)), 57344.0);
        assert_eq!(f32::from_bits(e5m2(0x7c)), f32::INFINITY);
        assert_eq!(f32::from_bits(e5m2(0x01)), 2f32.powi(-16));
        for b in 0..=255u8 {
            assert_eq!(e5m2(b), f16_compute((b as u16) << 8), "{b:#04x}");
        }
        // E4M3 against its definition, code by code.
        for b in 0..=255u8 {
            let (sign, exp, man) = ((b >> 7) as i32, ((b >> 3) & 0xf) as i32, (b & 7) as f32);
            let magnitude = if exp == 0 {
                man / 8.0 * 2f32.powi(-6)
            } else {
                (1.0 + man / 8.0) * 2f32.powi(exp - 7)
            };
            let want = if sign == 1 { -magnitude } else { magnitude };
            if b & 0x7f == 0x7f {
                assert!(f32::from_bits(e4m3(b)).is_nan());
            } else {
                assert_eq!(e4m3(b), want.to_bits(), "{b:#04x}");
            }
        }
    }

    /// AMD's FNUZ formats from their definitions: bias 8 / 16, 0x80 the only NaN, the
    /// all-ones exponent finite.
    #[test]
    fn fnuz_known_values() {
        let e4 = |b| f32::from_bits(fnuz_compute(b, 4, 8));
        let e5 = |b| f32::from_bits(fnuz_compute(b, 5, 16));
        assert_eq!(e4(0x40), 1.0);
        assert_eq!(e4(0x7f), 240.0);
        assert_eq!(e4(0xff), -240.0);
        assert_eq!(e4(0x01), 2f32.powi(-10));
        assert_eq!(e4(0x07), 7.0 * 2f32.powi(-10));
        assert_eq!(e4(0x08), 2f32.powi(-7));
        assert_eq!(e5(0x40), 1.0);
        assert_eq!(e5(0x7f), 57344.0);
        assert_eq!(e5(0x7c), 32768.0);
        assert_eq!(e5(0x01), 2f32.powi(-17));
        assert_eq!(e5(0x03), 3.0 * 2f32.powi(-17));
        for f in [e4, e5] {
            assert!(f(0x80).is_nan());
            assert_eq!(f(0x00).to_bits(), 0);
            assert!((0..=255u8).filter(|&b| f(b).is_nan()).count() == 1);
            assert!((0..=255u8).all(|b| !f(b).is_infinite()));
        }
    }

    /// OCP MX v1.0: E8M0 is 2^(e-127) with 0xFF NaN; E2M1 has exponent bias 1, one mantissa
    /// bit and a subnormal 0.5.
    #[test]
    fn mx_known_values() {
        let e = |b| f32::from_bits(e8m0_compute(b));
        assert_eq!(e(127), 1.0);
        assert_eq!(e(0), 2f32.powi(-127));
        assert_eq!(e(254), 2f32.powi(127));
        assert!(e(255).is_nan());
        for code in 0..16u32 {
            let (sign, exp, man) = (code >> 3, (code >> 1) & 3, code & 1);
            let mag = if exp == 0 {
                0.5 * man as f32
            } else {
                2f32.powi(exp as i32 - 1) * (1.0 + 0.5 * man as f32)
            };
            let want = if sign == 1 { -mag } else { mag };
            assert_eq!(F4_VALUES[code as usize].to_bits(), want.to_bits(), "{code}");
        }
        assert_eq!(Dtype::F4.bytes(64), 32);
        assert_eq!(Dtype::F4.bits(), 4);
        assert_eq!(Dtype::BF16.bytes(3), 6);
    }

    #[test]
    fn widening_is_injective() {
        let mut seen: Vec<u32> = (0..=u16::MAX).map(f16_compute).collect();
        seen.sort_unstable();
        seen.dedup();
        assert_eq!(seen.len(), 65536);
        let fnuz4 = |b| fnuz_compute(b, 4, 8);
        let fnuz5 = |b| fnuz_compute(b, 5, 16);
        for f in [e4m3, e5m2, fnuz4, fnuz5, e8m0_compute] {
            let mut seen: Vec<u32> = (0..=255u8).map(f).collect();
            seen.sort_unstable();
            seen.dedup();
            assert_eq!(seen.len(), 256);
        }
        // f32 -> f64 keeps signalling and quiet NaNs apart.
        assert_ne!(f32_to_f64_bits(0x7f80_0001), f32_to_f64_bits(0x7fc0_0001));
        assert_eq!(f64::from_bits(f32_to_f64_bits(1.5f32.to_bits())), 1.5);
    }
}
