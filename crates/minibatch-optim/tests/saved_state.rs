//! The saved state's bytes: deterministic (two identical runs write the same
//! file) and readable across format versions.

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use minibatch_optim::{
    Adam, AdamConfig, OptimError, Optimizer, RmsProp, RmsPropConfig, Sgd, SgdConfig,
};

fn fixture(name: &str) -> Vec<u8> {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("tests/fixtures")
        .join(name);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// Named parameters with deterministic values.
fn params(dtype: DType) -> Vec<(String, Var)> {
    ["enc.weight", "enc.bias", "head.weight", "head.bias"]
        .iter()
        .enumerate()
        .map(|(i, n)| {
            let len = 3 + 2 * i;
            let v: Vec<f64> = (0..len)
                .map(|j| ((i * 7 + j) as f64 * 0.37).sin())
                .collect();
            let t = Tensor::new(v, &Device::Cpu)
                .unwrap()
                .to_dtype(dtype)
                .unwrap();
            (n.to_string(), Var::from_tensor(&t).unwrap())
        })
        .collect()
}

fn step_all(opt: &mut dyn Optimizer, k: usize) {
    let mut g = GradStore::default();
    for (i, v) in opt.vars().iter().enumerate() {
        // Skip one parameter on odd steps (so step counts differ).
        if k % 2 == 1 && i == 1 {
            continue;
        }
        let t = v
            .as_tensor()
            .affine(0.5, 0.1 * (k + i) as f64)
            .unwrap()
            .cos()
            .unwrap();
        g.insert(v.as_tensor(), t);
    }
    opt.step(&g).unwrap();
}

/// Builds and steps an optimizer the same way every time.
fn build(which: usize) -> Box<dyn Optimizer> {
    let mut opt: Box<dyn Optimizer> = match which {
        0 => Box::new(
            Adam::named(
                params(DType::F32),
                AdamConfig {
                    amsgrad: true,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
        1 => {
            let p = params(DType::F64);
            let (a, b) = p.split_at(2);
            let cfg = |lr, momentum| SgdConfig {
                lr,
                momentum,
                ..Default::default()
            };
            Box::new(
                Sgd::with_groups(vec![
                    (a.to_vec(), cfg(0.1, 0.9)),
                    (b.to_vec(), cfg(0.01, 0.0)),
                ])
                .unwrap(),
            )
        }
        _ => Box::new(
            RmsProp::named(
                params(DType::BF16),
                RmsPropConfig {
                    centered: true,
                    ..Default::default()
                },
            )
            .unwrap(),
        ),
    };
    for k in 0..3 {
        step_all(opt.as_mut(), k);
    }
    opt
}

#[test]
fn identical_runs_write_identical_bytes() {
    for which in 0..3 {
        let first = build(which).state_bytes().unwrap();
        // Several builds: a HashMap-ordered header would differ in some.
        for _ in 0..8 {
            let again = build(which).state_bytes().unwrap();
            assert!(
                again == first,
                "optimizer {which}: state bytes differ between identical runs"
            );
        }
        // Saving twice from one optimizer, and the files written, agree too.
        let opt = build(which);
        assert!(opt.state_bytes().unwrap() == opt.state_bytes().unwrap());
        let dir = tempfile::tempdir().unwrap();
        let (a, b) = (dir.path().join("a.bin"), dir.path().join("b.bin"));
        opt.save_state(&a).unwrap();
        build(which).save_state(&b).unwrap();
        assert!(std::fs::read(&a).unwrap() == std::fs::read(&b).unwrap());
        // The bytes are a valid safetensors file that loads back.
        let mut fresh = build(which);
        fresh.load_state_bytes(&first).unwrap();
        assert!(fresh.state_bytes().unwrap() == first);
    }
}

#[test]
fn the_header_lists_sorted_metadata_and_tensors() {
    let bytes = build(1).state_bytes().unwrap();
    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
    assert_eq!(n % 8, 0);
    let header = std::str::from_utf8(&bytes[8..8 + n]).unwrap();
    let meta_keys = [
        "minibatch.format",
        "minibatch.groups",
        "minibatch.kind",
        "minibatch.version",
    ];
    let pos: Vec<usize> = meta_keys.iter().map(|k| header.find(k).unwrap()).collect();
    assert!(pos.windows(2).all(|w| w[0] < w[1]), "{header}");
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let mut names: Vec<(usize, String)> = st
        .tensors()
        .into_iter()
        .map(|(name, view)| (view.data().as_ptr() as usize, name))
        .collect();
    names.sort();
    // As `safetensors::serialize` orders them: by dtype (i64 step counts
    // before f64 buffers), then by name.
    let order: Vec<&str> = names.iter().map(|(_, n)| n.as_str()).collect();
    assert_eq!(
        order,
        [
            "enc.bias.step",
            "enc.weight.step",
            "head.bias.step",
            "head.weight.step",
            "enc.bias.momentum_buffer",
            "enc.weight.momentum_buffer",
        ]
    );
}

/// Format 1 (each group's lr saved twice, beside and inside the
/// hyperparameters) still loads. The fixtures were written by the commit
/// before format 2 (a5875574) with:
///
/// ```ignore
/// let w = Var::new(&[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]], &Device::Cpu)?;
/// let b = Var::new(&[0.1f32, -0.2], &Device::Cpu)?;
/// let cfg = SgdConfig { lr: 0.1, momentum: 0.9, dampening: 0.1, weight_decay: 0.01, ..Default::default() };
/// let mut opt = Sgd::named(vec![("fc.weight".into(), w.clone()), ("fc.bias".into(), b.clone())], cfg)?;
/// for s in 0..2 { opt.step(&sgd_grads(&w, &b, s))?; }
/// opt.set_learning_rate(0.05);
/// std::fs::write("sgd_format1.safetensors", opt.state_bytes()?)?;
/// let a = Var::new(&[1.0f64, -2.0], &Device::Cpu)?;
/// let mut adam = Adam::named(vec![("a".into(), a.clone())], AdamConfig { lr: 0.01, amsgrad: true, ..Default::default() })?;
/// for s in 0..3 { adam.step(&adam_grads(&a, s))?; }
/// std::fs::write("adam_format1.safetensors", adam.state_bytes()?)?;
/// ```
#[test]
fn format_1_state_still_loads() {
    let sgd_grads = |w: &Var, b: &Var, s: usize| {
        let mut g = GradStore::default();
        let gw = Tensor::new(&[[0.3f32, -0.1, 0.2], [0.05, 0.4, -0.6]], &Device::Cpu).unwrap();
        let gb = Tensor::new(&[1.0f32, -0.5], &Device::Cpu).unwrap();
        g.insert(w.as_tensor(), gw.affine(1.0 + s as f64, 0.0).unwrap());
        g.insert(b.as_tensor(), gb.affine(1.0 - 0.5 * s as f64, 0.0).unwrap());
        g
    };
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        dampening: 0.1,
        weight_decay: 0.01,
        ..Default::default()
    };
    let make = || {
        let w = Var::new(&[[0.5f32, -1.0, 2.0], [1.5, 0.25, -0.75]], &Device::Cpu).unwrap();
        let b = Var::new(&[0.1f32, -0.2], &Device::Cpu).unwrap();
        (w, b)
    };
    // The same two steps today.
    let (w, b) = make();
    let mut now = Sgd::named(
        vec![
            ("fc.weight".into(), w.clone()),
            ("fc.bias".into(), b.clone()),
        ],
        cfg,
    )
    .unwrap();
    for s in 0..2 {
        now.step(&sgd_grads(&w, &b, s)).unwrap();
    }
    // Loaded into an optimizer built with other hyperparameters: the saved
    // ones, the lr in force (0.05) included, come back.
    let (w1, b1) = make();
    let mut old = Sgd::named(
        vec![("fc.weight".into(), w1), ("fc.bias".into(), b1)],
        SgdConfig {
            lr: 0.3,
            momentum: 0.5,
            ..Default::default()
        },
    )
    .unwrap();
    old.load_state_bytes(&fixture("sgd_format1.safetensors"))
        .unwrap();
    assert_eq!(old.rule(0), Some(&SgdConfig { lr: 0.05, ..cfg }));
    assert_eq!(old.step_count("fc.weight"), 2);
    for name in ["fc.weight", "fc.bias"] {
        let a = old.state_tensor(name, "momentum_buffer").unwrap().unwrap();
        let b = now.state_tensor(name, "momentum_buffer").unwrap().unwrap();
        assert_eq!(
            a.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            b.flatten_all().unwrap().to_vec1::<f32>().unwrap(),
            "{name}"
        );
    }
    // Re-saved, it is format 2 and loads like any other.
    let resaved = old.state_bytes().unwrap();
    now.load_state_bytes(&resaved).unwrap();
    assert_eq!(now.learning_rate(), 0.05);

    let a = Var::new(&[1.0f64, -2.0], &Device::Cpu).unwrap();
    let mut adam = Adam::named(vec![("a".into(), a)], AdamConfig::default()).unwrap();
    adam.load_state_bytes(&fixture("adam_format1.safetensors"))
        .unwrap();
    let r = adam.rule(0).unwrap();
    assert!(r.amsgrad && r.lr == 0.01, "{r:?}");
    assert_eq!(adam.step_count("a"), 3);
    assert!(adam.state_tensor("a", "max_exp_avg_sq").unwrap().is_some());
}

#[test]
fn a_newer_format_is_a_clear_error() {
    let bytes = build(1).state_bytes().unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let mut meta = header.metadata().clone().unwrap();
    meta.insert("minibatch.format".into(), "3".into());
    let future = safetensors::serialize(st.tensors(), Some(meta)).unwrap();
    let mut opt = build(1);
    let e = opt.load_state_bytes(&future).unwrap_err();
    assert!(matches!(e, OptimError::StateMismatch(_)), "{e}");
    let msg = e.to_string();
    assert!(
        msg.contains("format 3") && msg.contains("formats 1 and 2"),
        "{msg}"
    );
    assert!(
        opt.state_bytes().unwrap() == bytes,
        "a refused load changed the optimizer"
    );
}
