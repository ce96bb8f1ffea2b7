//! Replays every PyTorch optimizer trajectory listed in the reference
//! directory's `index.json` (see `tests/fixtures/torch/README.md`), on every
//! available device, through both the fused in-place path and the tensor-op
//! path (the one CUDA parameters take).
//!
//! The references were generated with PyTorch 2.x on CPU, per case:
//!
//! ```python
//! params = [torch.randn(3, 4), torch.randn(5), torch.randn(2, 3, 2)]  # dtype of the case
//! opt = getattr(torch.optim, optimizer)(params, **hyperparameters)   # e.g. SGD(params, lr=0.05, momentum=0.9)
//! for k in range(steps):
//!     for i, p in enumerate(params):
//!         p.grad = grads[k][i]                                        # saved as grad.{k}.{i}
//!     opt.step()
//!     save(param.{i}.after.{k} = p for each i)
//! ```
mod common;

use std::collections::HashMap;

use candle_core::backprop::GradStore;
use candle_core::{Device, Var};
use minibatch_optim::{
    AdagradConfig, AdamConfig, AdamWConfig, GenericOptimizer, Optimizer, RmsPropConfig, SgdConfig,
    UpdateRule,
};
use minibatch_testkit::{assert_close, Tol};
use serde_json::{Map, Value};

/// Consumes PyTorch keyword arguments; leftovers fail the test by name.
struct Kw {
    class: String,
    map: Map<String, Value>,
}

impl Kw {
    fn f(&mut self, key: &str, default: f64) -> f64 {
        match self.map.remove(key) {
            Some(v) => v
                .as_f64()
                .unwrap_or_else(|| panic!("{}: `{key}` = {v} is not a number", self.class)),
            None => default,
        }
    }
    fn b(&mut self, key: &str, default: bool) -> bool {
        match self.map.remove(key) {
            Some(v) => v
                .as_bool()
                .unwrap_or_else(|| panic!("{}: `{key}` = {v} is not a bool", self.class)),
            None => default,
        }
    }
    fn betas(&mut self, default: (f64, f64)) -> (f64, f64) {
        match self.map.remove("betas") {
            Some(Value::Array(a)) if a.len() == 2 => {
                (a[0].as_f64().unwrap(), a[1].as_f64().unwrap())
            }
            Some(v) => panic!("{}: betas = {v} is not a pair", self.class),
            None => default,
        }
    }
    fn done(self) {
        assert!(
            self.map.is_empty(),
            "{}: unsupported hyperparameter(s) {:?}",
            self.class,
            self.map.keys().collect::<Vec<_>>()
        );
    }
}

fn finish<R: UpdateRule>(vars: Vec<Var>, cfg: R, tensor_path: bool) -> Box<dyn Optimizer> {
    let mut opt = GenericOptimizer::new(vars, cfg).expect("valid hyperparameters");
    opt.set_tensor_path(tensor_path);
    Box::new(opt)
}

/// Maps a torch.optim class and its keyword arguments onto ours.
fn build(class: &str, hp: &Value, vars: Vec<Var>, tensor_path: bool) -> Box<dyn Optimizer> {
    let mut k = Kw {
        class: class.to_string(),
        map: hp.as_object().cloned().unwrap_or_default(),
    };
    let opt = match class {
        "SGD" => {
            let d = SgdConfig::default();
            let cfg = SgdConfig {
                lr: k.f("lr", d.lr),
                momentum: k.f("momentum", d.momentum),
                dampening: k.f("dampening", d.dampening),
                weight_decay: k.f("weight_decay", d.weight_decay),
                nesterov: k.b("nesterov", d.nesterov),
                maximize: k.b("maximize", d.maximize),
            };
            finish(vars, cfg, tensor_path)
        }
        "Adam" => {
            let d = AdamConfig::default();
            let (beta1, beta2) = k.betas((d.beta1, d.beta2));
            let cfg = AdamConfig {
                lr: k.f("lr", d.lr),
                beta1,
                beta2,
                eps: k.f("eps", d.eps),
                weight_decay: k.f("weight_decay", d.weight_decay),
                amsgrad: k.b("amsgrad", d.amsgrad),
                maximize: k.b("maximize", d.maximize),
            };
            finish(vars, cfg, tensor_path)
        }
        "AdamW" => {
            let d = AdamWConfig::default().adam;
            let (beta1, beta2) = k.betas((d.beta1, d.beta2));
            let cfg = AdamWConfig {
                adam: AdamConfig {
                    lr: k.f("lr", d.lr),
                    beta1,
                    beta2,
                    eps: k.f("eps", d.eps),
                    weight_decay: k.f("weight_decay", d.weight_decay),
                    amsgrad: k.b("amsgrad", d.amsgrad),
                    maximize: k.b("maximize", d.maximize),
                },
            };
            finish(vars, cfg, tensor_path)
        }
        "RMSprop" => {
            let d = RmsPropConfig::default();
            let cfg = RmsPropConfig {
                lr: k.f("lr", d.lr),
                alpha: k.f("alpha", d.alpha),
                eps: k.f("eps", d.eps),
                weight_decay: k.f("weight_decay", d.weight_decay),
                momentum: k.f("momentum", d.momentum),
                centered: k.b("centered", d.centered),
                maximize: k.b("maximize", d.maximize),
            };
            finish(vars, cfg, tensor_path)
        }
        "Adagrad" => {
            let d = AdagradConfig::default();
            let cfg = AdagradConfig {
                lr: k.f("lr", d.lr),
                lr_decay: k.f("lr_decay", d.lr_decay),
                weight_decay: k.f("weight_decay", d.weight_decay),
                initial_accumulator_value: k
                    .f("initial_accumulator_value", d.initial_accumulator_value),
                eps: k.f("eps", d.eps),
                maximize: k.b("maximize", d.maximize),
            };
            finish(vars, cfg, tensor_path)
        }
        other => panic!("unknown optimizer class `{other}` in the reference data"),
    };
    k.done();
    opt
}

/// The file's string metadata, each value parsed as JSON.
fn metadata(path: &std::path::Path) -> HashMap<String, Value> {
    let bytes = std::fs::read(path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).expect("safetensors header");
    meta.metadata()
        .clone()
        .unwrap_or_default()
        .into_iter()
        .map(|(k, v)| {
            let parsed = serde_json::from_str(&v).unwrap_or(Value::String(v));
            (k, parsed)
        })
        .collect()
}

#[test]
fn optimizers_match_pytorch_trajectories() {
    let dir = common::reference_dir();
    let index = common::reference_index();
    let cases = index["optimizers"]
        .as_array()
        .expect("index.json: `optimizers` list");
    assert!(!cases.is_empty(), "no optimizer cases in index.json");
    // Every (optimizer, dtype) the rules cover must have a trajectory, and
    // every trajectory must compare each parameter after each step.
    let mut covered = std::collections::BTreeSet::new();
    for case in cases {
        let file = case["file"].as_str().expect("case without `file`");
        let path = dir.join(file);
        let meta = metadata(&path);
        // The file's metadata is authoritative; index.json must agree with it.
        for key in ["optimizer", "hyperparameters", "steps", "params", "dtype"] {
            if let (Some(m), Some(i)) = (meta.get(key), case.get(key)) {
                assert_eq!(
                    m, i,
                    "{file}: `{key}` differs between index.json and the file"
                );
            }
        }
        let get = |key: &str| {
            meta.get(key)
                .or(case.get(key))
                .unwrap_or_else(|| panic!("{file}: no `{key}`"))
                .clone()
        };
        let class = get("optimizer");
        let class = class.as_str().expect("optimizer name");
        let hp = get("hyperparameters");
        let steps = get("steps").as_u64().expect("steps") as usize;
        let n_params = get("params").as_u64().expect("params") as usize;
        let dtype = get("dtype");
        let (rtol, atol) = match dtype.as_str() {
            Some("f64") => (1e-12, 1e-14),
            Some("f32") => (1e-5, 1e-6),
            other => panic!("{file}: unsupported dtype {other:?}"),
        };
        let data = candle_core::safetensors::load(&path, &Device::Cpu).expect("reference tensors");
        let t = |key: String| {
            data.get(&key)
                .unwrap_or_else(|| panic!("{file}: missing `{key}`"))
                .clone()
        };
        assert!(
            steps > 0 && n_params > 0,
            "{file}: no steps or no parameters"
        );
        let devices = minibatch_data::available_devices();
        let mut compared = 0;
        for device in &devices {
            for tensor_path in [false, true] {
                let ctx = format!(
                    "{file} on {device:?} ({} path)",
                    if tensor_path { "tensor-op" } else { "fused" }
                );
                let vars: Vec<Var> = (0..n_params)
                    .map(|i| {
                        Var::from_tensor(&t(format!("param.{i}.init")).to_device(device).unwrap())
                            .unwrap()
                    })
                    .collect();
                let mut opt = build(class, &hp, vars.clone(), tensor_path);
                assert_eq!(opt.name(), class);
                for k in 0..steps {
                    let mut grads = GradStore::default();
                    for (i, v) in vars.iter().enumerate() {
                        grads.insert(
                            v.as_tensor(),
                            t(format!("grad.{k}.{i}")).to_device(device).unwrap(),
                        );
                    }
                    opt.step(&grads)
                        .unwrap_or_else(|e| panic!("{ctx}: step {k}: {e}"));
                    for (i, v) in vars.iter().enumerate() {
                        let want = t(format!("param.{i}.after.{k}"));
                        assert_close(
                            v.as_tensor(),
                            &want,
                            Tol::new(atol, rtol),
                            &format!("{ctx}: param {i} after step {k}"),
                        );
                        compared += 1;
                    }
                }
            }
        }
        assert_eq!(
            compared,
            devices.len() * 2 * steps * n_params,
            "{file}: not every parameter was compared after every step"
        );
        covered.insert((class.to_string(), dtype.as_str().unwrap_or("?").to_string()));
    }
    for class in ["SGD", "Adam", "AdamW", "RMSprop", "Adagrad"] {
        for dtype in ["f32", "f64"] {
            assert!(
                covered.contains(&(class.to_string(), dtype.to_string())),
                "index.json has no {class} {dtype} trajectory"
            );
        }
    }
}
