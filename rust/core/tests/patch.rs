//! Patches on their own: created, opened, applied and chained on files written here.

use std::collections::BTreeMap;
use std::path::Path;

use rlmask_core::patch::{self, Codec, Form, Patch};
use rlmask_core::safetensors::write_u8_tensors;
use rlmask_core::{Checkpoint, Error, Progress};

fn write(path: &Path, tensors: &[(&str, &[u8])]) {
    write_u8_tensors(path, tensors, &BTreeMap::new()).unwrap();
}

#[test]
fn a_chain_applies_bit_exactly_and_out_of_order_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let x: Vec<u8> = (0..200u8).collect();
    let mut y = x.clone();
    y[7] ^= 1;
    y[150] ^= 4;
    let z: Vec<u8> = y.iter().map(|v| v.wrapping_add(1)).collect(); // every element changes
    for (name, w) in [("a", &x), ("b", &y), ("c", &z)] {
        std::fs::create_dir(d.join(name)).unwrap();
        write(
            &d.join(name).join("model.safetensors"),
            &[("w", w), ("k", &x)],
        );
    }
    let open = |n: &str| Checkpoint::open(&d.join(n)).unwrap();
    let (a, b, c) = (open("a"), open("b"), open("c"));
    let p = Progress::default();
    for codec in [Codec::Plain, Codec::Compact] {
        let tag = codec.name();
        let create = |x: &Checkpoint, y: &Checkpoint, name: &str| {
            let out = d.join(format!("{name}.{tag}.rlpatch"));
            patch::create(x, y, &out, &[], codec, &BTreeMap::new(), &p).unwrap();
            Patch::open(&out).unwrap()
        };
        let (pab, pbc) = (create(&a, &b, "ab"), create(&b, &c, "bc"));
        assert_eq!(pab.codec, codec);
        assert_eq!(pab.entries["w"].changed, 2);
        // Two changes: plain indices and values are smaller than a compact frame.
        assert_eq!(pab.entries["w"].form, Form::Sparse);
        assert_eq!(pab.entries["k"].form, Form::None);
        assert_eq!(pbc.entries["w"].form, Form::Dense);
        let (idx, vals) = pab.changes("w").unwrap().unwrap();
        assert_eq!((idx, vals), (Some(vec![7, 150]), vec![y[7], y[150]]));
        assert_eq!(pab.changes("k").unwrap(), None);
        let out = d.join(format!("out.{tag}"));
        patch::apply(&a, &[&pab, &pbc], &out, &p).unwrap();
        assert_eq!(
            std::fs::read(out.join("model.safetensors")).unwrap(),
            std::fs::read(d.join("c/model.safetensors")).unwrap()
        );
        for wrong in [vec![&pbc], vec![&pab, &pab], vec![&pbc, &pab]] {
            let err = patch::apply(&a, &wrong, &d.join("bad"), &p).unwrap_err();
            assert!(matches!(err, Error::Pairing { .. }), "{err}");
            assert!(!d.join("bad").exists());
        }
        patch::verify(&a, &pab, Some(&b), &p).unwrap();
        assert!(patch::verify(&a, &pab, Some(&c), &p).is_err());
    }
    // Two checkpoints without tensors: nothing to patch, no file.
    for name in ["e1", "e2"] {
        std::fs::create_dir(d.join(name)).unwrap();
        write(&d.join(name).join("model.safetensors"), &[]);
    }
    let (e1, e2) = (open("e1"), open("e2"));
    let err = patch::create(
        &e1,
        &e2,
        &d.join("e.rlpatch"),
        &[],
        Codec::Plain,
        &BTreeMap::new(),
        &p,
    )
    .err()
    .unwrap();
    assert!(err.to_string().contains("nothing to patch"), "{err}");
    assert!(!d.join("e.rlpatch").exists());
    // A checkpoint is not a patch.
    let err = Patch::open(&d.join("a/model.safetensors")).err().unwrap();
    assert!(err.to_string().contains("not an rlmask patch"), "{err}");
}

/// A tensor of several frames (the codec cuts one per 2^20 elements): plain and compact
/// patches give the same changes and the same checkpoint; a compact patch with one byte of a
/// frame flipped, or a frame table that lies, is refused, naming the tensor, with no output.
#[test]
fn compact_frames_decode_to_the_plain_changes_and_corruption_is_caught() {
    let dir = tempfile::tempdir().unwrap();
    let d = dir.path();
    let n = 3 * (1 << 20) + 12345;
    let x: Vec<u8> = (0..n).map(|i| ((i * 7919) % 251) as u8).collect();
    let mut y = x.clone();
    let mut state = 0x9e3779b97f4a7c15u64;
    for _ in 0..40_000 {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        let i = (state % n as u64) as usize;
        y[i] = y[i].wrapping_add(1 + (state >> 60) as u8);
    }
    for (name, w) in [("a", &x), ("b", &y)] {
        std::fs::create_dir(d.join(name)).unwrap();
        write(&d.join(name).join("model.safetensors"), &[("w", w)]);
    }
    let a = Checkpoint::open(&d.join("a")).unwrap();
    let b = Checkpoint::open(&d.join("b")).unwrap();
    let p = Progress::default();
    let mut opened = Vec::new();
    for codec in [Codec::Plain, Codec::Compact] {
        let out = d.join(format!("{}.rlpatch", codec.name()));
        patch::create(&a, &b, &out, &[], codec, &BTreeMap::new(), &p).unwrap();
        let patch = Patch::open(&out).unwrap();
        let dir = d.join(format!("out-{}", codec.name()));
        patch::apply(&a, &[&patch], &dir, &p).unwrap();
        assert_eq!(
            std::fs::read(dir.join("model.safetensors")).unwrap(),
            std::fs::read(d.join("b/model.safetensors")).unwrap()
        );
        opened.push(patch);
    }
    let (plain, compact) = (&opened[0], &opened[1]);
    assert_eq!(plain.entries["w"].form, Form::Sparse);
    assert_eq!(compact.entries["w"].form, Form::Compact);
    let want: Vec<u64> = (0..n).filter(|&i| x[i] != y[i]).map(|i| i as u64).collect();
    let (idx, vals) = plain.changes("w").unwrap().unwrap();
    assert_eq!(idx.as_deref(), Some(&want[..]));
    assert_eq!(
        vals,
        want.iter().map(|&i| y[i as usize]).collect::<Vec<u8>>()
    );
    assert_eq!(compact.changes("w").unwrap(), plain.changes("w").unwrap());
    assert!(compact.bytes()["compact"] < plain.bytes()["indices"]);
    assert_eq!(compact.plain_bytes(), plain.plain_bytes());
    assert_eq!(plain.plain_bytes(), 5 * want.len() as u64);

    // One flipped byte in the last frame; then a frame table whose counts are shifted.
    let raw = std::fs::read(d.join("compact.rlpatch")).unwrap();
    let mut flipped = raw.clone();
    let last = flipped.len() - 40;
    flipped[last] ^= 0x55;
    std::fs::write(d.join("flipped.rlpatch"), &flipped).unwrap();
    let bad = Patch::open(&d.join("flipped.rlpatch")).unwrap();
    let err = patch::apply(&a, &[&bad], &d.join("never"), &p).unwrap_err();
    assert!(err.to_string().contains("'w'"), "{err}");
    assert!(!d.join("never").exists());
    assert!(bad.changes("w").is_err());

    let hlen = u64::from_le_bytes(raw[..8].try_into().unwrap()) as usize;
    let header: serde_json::Value = serde_json::from_slice(&raw[8..8 + hlen]).unwrap();
    let at = header["w.frames"]["data_offsets"][0].as_u64().unwrap() as usize + 8 + hlen;
    let mut lying = raw.clone();
    let count = |k: usize| at + 24 * k + 8; // frame k's count, int64
    lying[count(0)] = lying[count(0)].wrapping_add(1);
    lying[count(1)] = lying[count(1)].wrapping_sub(1);
    std::fs::write(d.join("lying.rlpatch"), &lying).unwrap();
    let bad = Patch::open(&d.join("lying.rlpatch")).unwrap(); // the sums still agree
    let err = bad.changes("w").unwrap_err();
    assert!(err.to_string().contains("frame 0"), "{err}");
    lying[count(1)] = lying[count(1)].wrapping_add(2); // now they do not
    std::fs::write(d.join("lying.rlpatch"), &lying).unwrap();
    let err = Patch::open(&d.join("lying.rlpatch")).err().unwrap();
    assert!(err.to_string().contains("'w'"), "{err}");
}
