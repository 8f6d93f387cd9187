//! Patches on their own: created, opened, applied and chained on files written here.

use std::collections::BTreeMap;
use std::path::Path;

use rlmask_core::patch::{self, Form, Patch};
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
    let ab = patch::create(&a, &b, &d.join("ab.rlpatch"), &[], &BTreeMap::new(), &p).unwrap();
    assert_eq!(ab.entries["w"].changed, 2);
    assert_eq!(ab.entries["w"].form, Form::Sparse);
    assert_eq!(ab.entries["k"].form, Form::None);
    let bc = patch::create(&b, &c, &d.join("bc.rlpatch"), &[], &BTreeMap::new(), &p).unwrap();
    assert_eq!(bc.entries["w"].form, Form::Dense);
    let (pab, pbc) = (
        Patch::open(&d.join("ab.rlpatch")).unwrap(),
        Patch::open(&d.join("bc.rlpatch")).unwrap(),
    );
    patch::apply(&a, &[&pab, &pbc], &d.join("out"), &p).unwrap();
    assert_eq!(
        std::fs::read(d.join("out/model.safetensors")).unwrap(),
        std::fs::read(d.join("c/model.safetensors")).unwrap()
    );
    for wrong in [vec![&pbc], vec![&pab, &pab], vec![&pbc, &pab]] {
        let err = patch::apply(&a, &wrong, &d.join("bad"), &p).unwrap_err();
        assert!(matches!(err, Error::Pairing { .. }), "{err}");
        assert!(!d.join("bad").exists());
    }
    patch::verify(&a, &pab, Some(&b), &p).unwrap();
    assert!(patch::verify(&a, &pab, Some(&c), &p).is_err());
    // Two checkpoints without tensors: nothing to patch, no file.
    for name in ["e1", "e2"] {
        std::fs::create_dir(d.join(name)).unwrap();
        write(&d.join(name).join("model.safetensors"), &[]);
    }
    let (e1, e2) = (open("e1"), open("e2"));
    let err = patch::create(&e1, &e2, &d.join("e.rlpatch"), &[], &BTreeMap::new(), &p)
        .err()
        .unwrap();
    assert!(err.to_string().contains("nothing to patch"), "{err}");
    assert!(!d.join("e.rlpatch").exists());
    // A checkpoint is not a patch.
    let err = Patch::open(&d.join("a/model.safetensors")).err().unwrap();
    assert!(err.to_string().contains("not an rlmask patch"), "{err}");
}
