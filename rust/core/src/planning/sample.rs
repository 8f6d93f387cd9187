//! Sampled diffs (design §14): which contiguous blocks of each tensor a sampled pass reads.
//!
//! Each tensor is a stratum. Its elements are cut into aligned blocks of `block` elements (the
//! last may be short), and a simple random sample of `round(fraction * blocks)` of them is
//! read (at least two, so that the stratum has a variance; a tensor with too few blocks for
//! that is read whole, an exact stratum). The blocks a seed draws depend only on the seed, the
//! tensor's name and its size: the same command reads the same bytes.

use std::collections::BTreeSet;

use crate::diff::CHUNK;
use crate::error::{Error, Result};
use crate::kernel::BLOCK;

/// A sample of the elements: about `fraction` of each tensor, in contiguous blocks.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct SampleOptions {
    /// Share of the elements to read, in (0, 1].
    pub fraction: f64,
    /// Seeds the blocks drawn (with each tensor's name).
    pub seed: u64,
    /// Elements per block, a multiple of 64 up to 2^18; 0: from the budget ([`block_size`]).
    pub block: usize,
}

/// Blocks every sample aims at in all, whatever its budget: enough blocks for the interval's
/// variance to be estimated, few enough that each block is a read worth making.
pub const TARGET_BLOCKS: f64 = 4096.0;

impl SampleOptions {
    pub(crate) fn check(&self) -> Result<()> {
        if !(self.fraction > 0.0 && self.fraction <= 1.0) {
            return Err(Error::InvalidArgument(format!(
                "a sample is a fraction of the elements in (0, 1], not {}",
                self.fraction
            )));
        }
        if self.block != 0 && (!self.block.is_multiple_of(BLOCK) || self.block > CHUNK) {
            return Err(Error::InvalidArgument(format!(
                "a sample's block is a multiple of {BLOCK} elements up to {CHUNK}, not {}",
                self.block
            )));
        }
        Ok(())
    }

    /// The block size: the one given, or the power of two (64 to 2^18) nearest below
    /// `fraction * elements / TARGET_BLOCKS`, so that a sample of any budget has thousands
    /// of blocks where the model allows.
    pub fn block_size(&self, elements: u64) -> usize {
        if self.block != 0 {
            return self.block;
        }
        let ideal = (self.fraction * elements as f64 / TARGET_BLOCKS).max(1.0) as u64;
        let pow2 = 1usize << (63 - ideal.leading_zeros());
        pow2.clamp(BLOCK, CHUNK)
    }
}

/// The blocks of one tensor that a sample reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Drawn {
    /// First element of each block read, ascending (file order).
    pub starts: Vec<usize>,
    /// Blocks the tensor has (the population of its stratum).
    pub blocks: u64,
    /// Read whole: an exact stratum.
    pub whole: bool,
}

/// The blocks of a tensor of `numel` elements, named `name`, that the sample reads.
pub fn draw(opts: &SampleOptions, name: &str, numel: usize, block: usize) -> Drawn {
    let blocks = numel.div_ceil(block);
    let want = (opts.fraction * blocks as f64).round() as usize;
    let want = want.max(2);
    if want >= blocks {
        return Drawn {
            starts: (0..blocks).map(|b| b * block).collect(),
            blocks: blocks as u64,
            whole: true,
        };
    }
    let mut rng = SplitMix(opts.seed ^ fnv1a(name.as_bytes()) ^ (numel as u64).rotate_left(32));
    // Floyd's algorithm: `want` distinct blocks, each subset equally likely.
    let mut chosen = BTreeSet::new();
    for j in blocks - want..blocks {
        let t = rng.below(j as u64 + 1) as usize;
        if !chosen.insert(t) {
            chosen.insert(j);
        }
    }
    Drawn {
        starts: chosen.into_iter().map(|b| b * block).collect(),
        blocks: blocks as u64,
        whole: false,
    }
}

/// FNV-1a of the name: mixes each tensor's name into its seed.
fn fnv1a(bytes: &[u8]) -> u64 {
    bytes.iter().fold(0xcbf2_9ce4_8422_2325, |h, &b| {
        (h ^ b as u64).wrapping_mul(0x0100_0000_01b3)
    })
}

/// SplitMix64 (Steele, Lea and Flood 2014): a small, well-mixed generator, enough to draw
/// blocks.
struct SplitMix(u64);

impl SplitMix {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    /// Uniform in `0..n` (Lemire's multiply-shift with rejection: no modulo bias).
    fn below(&mut self, n: u64) -> u64 {
        loop {
            let m = (self.next() as u128) * (n as u128);
            let low = m as u64;
            if low >= n.wrapping_neg() % n {
                return (m >> 64) as u64;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn opts(fraction: f64) -> SampleOptions {
        SampleOptions {
            fraction,
            seed: 7,
            block: 0,
        }
    }

    #[test]
    fn draws_distinct_sorted_blocks_reproducibly() {
        let o = opts(0.1);
        let d = draw(&o, "w", 1000 * 64 + 5, 64);
        assert_eq!(d.blocks, 1001);
        assert!(!d.whole);
        assert_eq!(d.starts.len(), 100);
        assert!(d.starts.windows(2).all(|w| w[0] < w[1]));
        assert!(d.starts.iter().all(|s| s % 64 == 0 && *s < 1000 * 64 + 5));
        assert_eq!(d, draw(&o, "w", 1000 * 64 + 5, 64));
        assert_ne!(d, draw(&o, "v", 1000 * 64 + 5, 64));
        assert_ne!(
            d,
            draw(&SampleOptions { seed: 8, ..o }, "w", 1000 * 64 + 5, 64)
        );
    }

    #[test]
    fn small_tensors_are_read_whole() {
        let d = draw(&opts(0.01), "norm", 100, 64);
        assert!(d.whole);
        assert_eq!(d.starts, vec![0, 64]);
        // Two blocks at least, so that the stratum has a variance.
        let d = draw(&opts(0.01), "w", 64 * 10, 64);
        assert_eq!((d.starts.len(), d.whole), (2, false));
    }

    #[test]
    fn every_block_equally_likely() {
        // 20 blocks, 5 drawn, 20000 draws: each block drawn a quarter of the time.
        let mut hits = [0u32; 20];
        for seed in 0..20000 {
            let o = SampleOptions {
                fraction: 0.25,
                seed,
                block: 64,
            };
            for s in draw(&o, "w", 20 * 64, 64).starts {
                hits[s / 64] += 1;
            }
        }
        for h in hits {
            assert!((4700..5300).contains(&h), "{hits:?}");
        }
    }

    #[test]
    fn block_size_from_the_budget() {
        assert_eq!(opts(0.01).block_size(7_000_000_000), 16384);
        assert_eq!(opts(0.01).block_size(1000), 64);
        assert_eq!(opts(1.0).block_size(1 << 40), CHUNK);
        assert!(SampleOptions {
            block: 100,
            ..opts(0.1)
        }
        .check()
        .is_err());
        assert!(opts(0.0).check().is_err() && opts(1.5).check().is_err());
    }
}
