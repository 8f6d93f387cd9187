//! The compact codec of sparse patches (design §9). A tensor's changes are cut into frames,
//! one per span of elements compared together; a frame holds its changes' positions as gaps
//! (`offset - previous - 1`, the first from -1) in LEB128 varints, then their values split
//! into byte planes (every value's first byte, then every value's second byte, ...), all
//! compressed as one zstd frame with its checksum. Gaps of a sparse update are small numbers,
//! and the byte planes put the sign and exponent bytes of bf16 weights, which vary little,
//! next to each other, where zstd finds them; the mantissa bytes stay close to incompressible.

/// zstd's level: 1 compresses a frame of bf16 changes as well as its default 3 (0.9% larger at
/// 1% changed, 3% smaller at 20%: the mantissa bytes are close to incompressible either way)
/// in two thirds of the time, and 3 as well as 9 (bench/bench_patch.py measures it).
pub const LEVEL: i32 = 1;

/// One frame of a compact tensor: the first element of its span, its changes, and the bytes
/// of its zstd frame. Stored as a row of three int64 in `NAME.frames`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Frame {
    pub start: u64,
    pub count: u64,
    pub bytes: u64,
}

fn put_varint(mut v: u64, out: &mut Vec<u8>) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(raw: &[u8], at: &mut usize) -> Option<u64> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let b = *raw.get(*at)?;
        *at += 1;
        v |= u64::from(b & 0x7f).checked_shl(shift)?;
        if b < 0x80 {
            return Some(v);
        }
    }
    None
}

/// Encodes the changes of one frame: `offsets` ascending from the frame's first element, and
/// their `values` (`size` bytes each, one after another).
pub fn encode(offsets: impl Iterator<Item = u64>, values: &[u8], size: usize) -> Vec<u8> {
    let count = values.len() / size.max(1);
    // Gaps below 2^14 (nearly all of them at RL's densities) are written as two bytes of which
    // the second counts only when needed, without a branch on the varint's length (one or two
    // bytes: at 1% changed a gap passes 127 about one time in four); larger ones take the loop.
    // `raw` always holds two bytes for every gap still to come past `n`.
    let mut raw = vec![0u8; 2 * count + 16];
    let mut n = 0usize;
    let mut prev = u64::MAX; // -1: the first gap counts from before the frame
    for o in offsets {
        let gap = o.wrapping_sub(prev).wrapping_sub(1);
        prev = o;
        if gap < 1 << 14 {
            let long = usize::from(gap >= 0x80);
            raw[n] = (gap & 0x7f) as u8 | (long as u8) << 7;
            raw[n + 1] = (gap >> 7) as u8;
            n += 1 + long;
        } else {
            let mut long = Vec::with_capacity(10);
            put_varint(gap, &mut long);
            raw.resize(raw.len() + long.len(), 0);
            raw[n..n + long.len()].copy_from_slice(&long);
            n += long.len();
        }
    }
    raw.truncate(n);
    let at = raw.len();
    raw.resize(at + count * size, 0);
    let planes = &mut raw[at..];
    if size == 2 {
        let (first, second) = planes.split_at_mut(count);
        for ((x, y), v) in first.iter_mut().zip(second).zip(values.chunks_exact(2)) {
            (*x, *y) = (v[0], v[1]);
        }
    } else {
        for (i, v) in values.chunks_exact(size.max(1)).enumerate() {
            for (plane, &byte) in v.iter().enumerate() {
                planes[plane * count + i] = byte;
            }
        }
    }
    // With a checksum, so that a damaged frame fails to decode rather than give wrong
    // values. Compressing a buffer in memory fails only for a parameter zstd does not know.
    // One compressor per thread, kept: making one (its context, about a megabyte, zeroed) for
    // every frame was a tenth of the compact codec's work at 1% changed.
    thread_local! {
        static COMPRESSOR: std::cell::RefCell<zstd::bulk::Compressor<'static>> = {
            let mut z = zstd::bulk::Compressor::new(LEVEL).expect("zstd level 1 is valid");
            z.set_parameter(zstd::zstd_safe::CParameter::ChecksumFlag(true))
                .expect("zstd knows its checksum flag");
            std::cell::RefCell::new(z)
        };
    }
    COMPRESSOR.with_borrow_mut(|z| {
        z.compress(&raw)
            .expect("compressing into a buffer zstd sizes")
    })
}

/// Decodes a frame of `count` changes of `size`-byte elements whose span is `span` elements,
/// appending their offsets (ascending, each below `span`) and values. Errs with the reason
/// for any frame that does not decode to exactly that.
pub fn decode(
    frame: &[u8],
    count: usize,
    size: usize,
    span: u64,
    offsets: &mut Vec<u64>,
    values: &mut Vec<u8>,
) -> Result<(), String> {
    let bound = count.saturating_mul(10 + size);
    // One decompressor per thread, kept, as for compressing.
    thread_local! {
        static DECOMPRESSOR: std::cell::RefCell<Option<zstd::bulk::Decompressor<'static>>> =
            const { std::cell::RefCell::new(None) };
    }
    let raw = DECOMPRESSOR
        .with_borrow_mut(|d| {
            let d = match d {
                Some(d) => d,
                None => d.insert(zstd::bulk::Decompressor::new()?),
            };
            d.decompress(frame, bound)
        })
        .map_err(|e| format!("zstd: {e}"))?;
    let mut at = 0;
    let mut prev = u64::MAX;
    offsets.reserve(count);
    for _ in 0..count {
        let gap = get_varint(&raw, &mut at).ok_or("a truncated or overlong gap")?;
        let o = prev
            .wrapping_add(1)
            .checked_add(gap)
            .filter(|&o| o < span)
            .ok_or_else(|| format!("a change past the frame's {span} elements"))?;
        offsets.push(o);
        prev = o;
    }
    let planes = &raw[at..];
    if planes.len() != count * size {
        return Err(format!(
            "{} bytes of values where {count} values take {}",
            planes.len(),
            count * size
        ));
    }
    let v0 = values.len();
    values.resize(v0 + count * size, 0);
    for (plane, bytes) in planes.chunks_exact(count.max(1)).enumerate() {
        for (k, &b) in bytes.iter().enumerate() {
            values[v0 + k * size + plane] = b;
        }
    }
    Ok(())
}

/// Decodes frame `k` of a tensor of `numel` elements whose frames are `frames` (`frame`: its
/// bytes), appending its changes' flat indices and values: its span ends where the next
/// frame begins, or at the tensor's end.
pub fn decode_nth(
    frames: &[Frame],
    k: usize,
    frame: &[u8],
    size: usize,
    numel: u64,
    indices: &mut Vec<u64>,
    values: &mut Vec<u8>,
) -> Result<(), String> {
    let f = frames[k];
    let span = frames.get(k + 1).map_or(numel, |g| g.start) - f.start;
    let from = indices.len();
    decode(frame, f.count as usize, size, span, indices, values)?;
    indices[from..].iter_mut().for_each(|i| *i += f.start);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_refuse_lies() {
        let offsets = [0u64, 1, 5, 200, 70_000, 1 << 40];
        let values: Vec<u8> = (0..offsets.len() * 2).map(|k| (k * 37) as u8).collect();
        let frame = encode(offsets.iter().copied(), &values, 2);
        let (mut o, mut v) = (Vec::new(), Vec::new());
        decode(&frame, offsets.len(), 2, (1 << 40) + 1, &mut o, &mut v).unwrap();
        assert_eq!(o, offsets);
        assert_eq!(v, values);
        // A span too short, a count too small or too large, bytes that are not zstd.
        assert!(decode(&frame, offsets.len(), 2, 1 << 40, &mut vec![], &mut vec![]).is_err());
        assert!(decode(&frame, 5, 2, u64::MAX, &mut vec![], &mut vec![]).is_err());
        assert!(decode(&frame, 7, 2, u64::MAX, &mut vec![], &mut vec![]).is_err());
        assert!(decode(&frame[1..], 6, 2, u64::MAX, &mut vec![], &mut vec![]).is_err());
        // No changes: an empty frame decodes to nothing.
        let empty = encode(std::iter::empty(), &[], 4);
        decode(&empty, 0, 4, 10, &mut o, &mut v).unwrap();
    }

    /// Gaps at the edges of one, two and three varint bytes, for every element size, decode
    /// to what was encoded.
    #[test]
    fn gaps_around_varint_lengths_round_trip() {
        let mut offsets = vec![0u64];
        for gap in [
            0u64, 1, 126, 127, 128, 129, 16_382, 16_383, 16_384, 16_385, 2_097_152,
        ] {
            for _ in 0..3 {
                offsets.push(offsets.last().unwrap() + gap + 1);
            }
        }
        let span = offsets.last().unwrap() + 1;
        for size in [1usize, 2, 4, 8] {
            let values: Vec<u8> = (0..offsets.len() * size).map(|k| (k * 29) as u8).collect();
            let frame = encode(offsets.iter().copied(), &values, size);
            let (mut o, mut v) = (Vec::new(), Vec::new());
            decode(&frame, offsets.len(), size, span, &mut o, &mut v).unwrap();
            assert_eq!((o, v), (offsets.clone(), values), "size {size}");
        }
    }

    #[test]
    fn varints_refuse_overflow() {
        let mut at = 0;
        assert_eq!(get_varint(&[0xff; 11], &mut at), None);
        let mut raw = Vec::new();
        put_varint(u64::MAX, &mut raw);
        at = 0;
        assert_eq!(get_varint(&raw, &mut at), Some(u64::MAX));
    }
}
