//! Times `rlmask_core::diff` on two checkpoints already on disk (warm cache):
//! `cargo run --release -p rlmask-core --example diffbench -- BASE TUNED [TOL...]`.
//! Set RAYON_NUM_THREADS=1 to measure one core; BLOCK=128x128 gives the block size of
//! block-scaled FP8 checkpoints.

use std::path::Path;
use std::time::Instant;

use rlmask_core::{diff, Checkpoint, Criterion, DiffOptions, Progress};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    if args.len() < 3 {
        return Err("usage: diffbench BASE TUNED [TOL...] (no TOL: exact)".into());
    }
    let a = Checkpoint::open(Path::new(&args[1]))?;
    let b = Checkpoint::open(Path::new(&args[2]))?;
    let tols: Vec<f64> = args[3..]
        .iter()
        .map(|t| t.parse())
        .collect::<Result<_, _>>()?;
    let criterion = if tols.is_empty() {
        Criterion::Exact
    } else {
        Criterion::Absolute(tols)
    };
    let block = std::env::var("BLOCK").ok().map(|b| {
        let (r, c) = b.split_once('x').expect("BLOCK=ROWSxCOLS");
        [r.parse().expect("rows"), c.parse().expect("cols")]
    });
    for mask in [None, Some(0)] {
        let mut opts = DiffOptions {
            mask_at: mask,
            ..DiffOptions::new(criterion.clone())
        };
        (opts.plan.block_base, opts.plan.block_tuned) = (block, block);
        for _ in 0..3 {
            let progress = Progress::default();
            let t = Instant::now();
            let r = diff(&a, &b, &opts, &progress)?;
            let s = t.elapsed().as_secs_f64();
            let bytes = progress.total.load(std::sync::atomic::Ordering::Relaxed) as f64;
            let changed: u64 = r.tensors.iter().map(|t| t.changed[0]).sum();
            println!(
                "mask={:?} {:.3} s  {:.2} GB/s  changed {changed}",
                mask.is_some(),
                s,
                bytes / s / 1e9
            );
        }
    }
    Ok(())
}
