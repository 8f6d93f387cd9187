//! The core on its own: checkpoints written to disk, opened, paired and compared.

use std::collections::BTreeMap;
use std::path::Path;

use rlmask_core::safetensors::write_u8_tensors;
use rlmask_core::{bits, diff, Checkpoint, Criterion, DiffOptions, Error, MaskFileSpec, Progress};

fn write(path: &Path, tensors: &[(&str, &[u8])]) {
    write_u8_tensors(path, tensors, &BTreeMap::new()).unwrap();
}

fn options(criterion: Criterion, mask: Option<usize>) -> DiffOptions {
    DiffOptions {
        criterion,
        select: None,
        skip_mismatched: false,
        mask_threshold: mask,
        mask_file: None,
    }
}

#[test]
fn pairs_counts_and_lists_one_sided_and_tied_names() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let x: Vec<u8> = (0..200u8).collect();
    let mut y = x.clone();
    for v in y.iter_mut().step_by(3) {
        *v ^= 1;
    }
    write(
        &a,
        &[
            ("w", &x),
            ("lm_head.weight", &x),
            ("model.embed_tokens.weight", &x),
            ("old", &x),
        ],
    );
    write(
        &b,
        &[("w", &y), ("model.embed_tokens.weight", &x), ("new", &x)],
    );
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let r = diff(
        &ca,
        &cb,
        &options(Criterion::Exact, None),
        &Progress::default(),
    )
    .unwrap();
    assert_eq!(r.only_in_base, vec!["old"]);
    assert_eq!(r.only_in_tuned, vec!["new"]);
    assert_eq!(r.tied, vec!["lm_head.weight"]);
    let w = r.tensors.iter().find(|t| t.name == "w").unwrap();
    // U8 tensors are compared bit for bit, padded to 200 bytes by the writer.
    assert_eq!((w.numel, w.floating, w.changed[0]), (200, false, 67));
    assert!(w.bits.is_none(), "masks cover floating tensors only");
}

#[test]
fn selection_mismatch_and_cancellation() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    write(&a, &[("x", &[1; 8]), ("y", &[1; 8])]);
    write(&b, &[("x", &[2; 8]), ("y", &[1; 16])]);
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let progress = Progress::default();
    let err = diff(&ca, &cb, &options(Criterion::Exact, None), &progress).unwrap_err();
    assert!(
        matches!(err, Error::Mismatch { ref tensor, .. } if tensor == "y"),
        "{err}"
    );
    let mut opts = options(Criterion::Exact, None);
    opts.skip_mismatched = true;
    let r = diff(&ca, &cb, &opts, &progress).unwrap();
    assert_eq!(r.skipped.len(), 1);
    assert_eq!(r.tensors[0].changed, vec![8]);
    opts.select = Some(vec!["y".into()]);
    let r = diff(&ca, &cb, &opts, &progress).unwrap();
    assert!(r.tensors.is_empty() && r.skipped[0].name == "y");
    progress
        .cancel
        .store(true, std::sync::atomic::Ordering::Relaxed);
    opts.select = None;
    assert!(matches!(
        diff(&ca, &cb, &opts, &progress),
        Err(Error::Cancelled)
    ));
}

#[test]
fn mask_bits_and_arguments() {
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        dir.path().join("a.safetensors"),
        dir.path().join("b.safetensors"),
    );
    let x: Vec<f32> = (0..1000).map(|i| i as f32).collect();
    let y: Vec<f32> = (0..1000)
        .map(|i| i as f32 + if i % 7 == 0 { 0.5 } else { 1e-7 })
        .collect();
    for (path, data) in [(&a, &x), (&b, &y)] {
        let header = format!(
            r#"{{"w":{{"dtype":"F32","shape":[{}],"data_offsets":[0,{}]}}}}"#,
            data.len(),
            4 * data.len()
        );
        let mut bytes = (header.len() as u64).to_le_bytes().to_vec();
        bytes.extend_from_slice(header.as_bytes());
        bytes.extend(data.iter().flat_map(|v| v.to_le_bytes()));
        std::fs::write(path, bytes).unwrap();
    }
    let (ca, cb) = (Checkpoint::open(&a).unwrap(), Checkpoint::open(&b).unwrap());
    let crit = Criterion::Absolute(vec![1e-8, 1e-3]);
    let r = diff(
        &ca,
        &cb,
        &options(crit.clone(), Some(1)),
        &Progress::default(),
    )
    .unwrap();
    let w = &r.tensors[0];
    // A reference, element by element (most 1e-7 steps vanish in f32 rounding).
    let want: Vec<u64> = [1e-8f32, 1e-3]
        .iter()
        .map(|&t| {
            x.iter()
                .zip(&y)
                .filter(|(p, q)| p.to_bits() != q.to_bits() && (*p - *q).abs() > t)
                .count() as u64
        })
        .collect();
    assert!(want[1] >= 143 && want[0] > want[1]);
    assert_eq!(w.changed, want);
    let bitsv = w.bits.as_ref().unwrap();
    assert_eq!(bitsv.len(), bits::padded_len(1000));
    assert_eq!(bits::count(bitsv, 1000).unwrap(), want[1]);
    // The same bits written straight into a mask file.
    let path = dir.path().join("m.rlmask");
    let mut opts = options(crit.clone(), Some(1));
    opts.mask_file = Some(MaskFileSpec {
        path: path.clone(),
        provenance: BTreeMap::from([("note".to_string(), "test".to_string())]),
    });
    let r2 = diff(&ca, &cb, &opts, &Progress::default()).unwrap();
    assert!(r2.tensors[0].bits.is_none() && r2.tensors[0].changed == want);
    let file = Checkpoint::open(&path).unwrap();
    let (shard, t) = file.get("w").unwrap();
    assert_eq!(shard.bytes(t), bitsv.as_slice());
    assert_eq!(shard.metadata["note"], "test");
    assert_eq!(shard.metadata["format"], "rlmask");
    let bad = options(Criterion::Absolute(vec![-1.0]), None);
    assert!(matches!(
        diff(&ca, &cb, &bad, &Progress::default()),
        Err(Error::InvalidArgument(_))
    ));
    let bad = options(crit, Some(2));
    assert!(matches!(
        diff(&ca, &cb, &bad, &Progress::default()),
        Err(Error::InvalidArgument(_))
    ));
}
