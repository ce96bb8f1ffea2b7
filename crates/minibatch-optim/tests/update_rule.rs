//! Changing hyperparameters after construction: one owner per
//! hyperparameter, guarded changes (`update_rule`, `set_group_lr`,
//! `set_momentum`), state buffers that follow the change as PyTorch's do,
//! and saved state that carries each hyperparameter once.

use candle_core::backprop::GradStore;
use candle_core::{Device, Tensor, Var};
use minibatch_optim::{
    Adam, AdamConfig, GenericOptimizer, OptimError, Optimizer, RmsProp, RmsPropConfig, Sgd,
    SgdConfig, UpdateRule,
};
use minibatch_testkit::{assert_close_slice, Tol};

/// The gradients fed at each step (the same in the PyTorch script below).
const GRADS: [[f64; 3]; 5] = [
    [0.3, -0.1, 0.2],
    [0.05, 0.4, -0.6],
    [-0.2, 0.1, 0.3],
    [0.5, -0.5, 0.25],
    [0.1, 0.2, -0.3],
];

fn var() -> Var {
    Var::new(&[1.0f64, -2.0, 0.5], &Device::Cpu).unwrap()
}

fn grads(v: &Var, i: usize) -> GradStore {
    let mut g = GradStore::default();
    g.insert(v.as_tensor(), Tensor::new(&GRADS[i], &Device::Cpu).unwrap());
    g
}

fn values(v: &Var) -> Vec<f64> {
    v.as_tensor().to_vec1().unwrap()
}

/// The tolerance against PyTorch's float64 values: `1e-14 · max(|want|, 1)`.
const TOL: Tol = Tol::rel(1e-14).floor(1.0);

/// Runs five steps of `opt` over `v`, calling `switch` before the third, and
/// returns the parameter after each step.
fn run<R: UpdateRule>(
    mut opt: GenericOptimizer<R>,
    v: &Var,
    switch: impl FnOnce(&mut GenericOptimizer<R>),
) -> Vec<Vec<f64>> {
    let mut switch = Some(switch);
    let mut out = vec![];
    for i in 0..GRADS.len() {
        if i == 2 {
            (switch.take().unwrap())(&mut opt);
        }
        opt.step(&grads(v, i)).unwrap();
        out.push(values(v));
    }
    out
}

// PyTorch 2.x (`~/.venv-torch/bin/python`), float64:
//
// ```python
// grads = [[0.3, -0.1, 0.2], [0.05, 0.4, -0.6], [-0.2, 0.1, 0.3],
//          [0.5, -0.5, 0.25], [0.1, 0.2, -0.3]]
// def run(make, switch, insert_zero=None):
//     p = torch.tensor([1.0, -2.0, 0.5], requires_grad=True)
//     opt = make([p]); out = []
//     for i, g in enumerate(grads):
//         if i == 2:
//             for k, v in switch.items(): opt.param_groups[0][k] = v
//             if insert_zero: opt.state[p][insert_zero] = torch.zeros_like(p)
//         p.grad = torch.tensor(g); opt.step(); out.append(p.detach().tolist())
//     return out
// run(lambda ps: torch.optim.SGD(ps, lr=0.1, momentum=0.0, dampening=0.2,
//                                weight_decay=0.01), {"momentum": 0.9})
// # RMSprop itself raises KeyError('momentum_buffer') here; with the buffer
// # a parameter created under momentum > 0 would have had (zeros):
// run(lambda ps: torch.optim.RMSprop(ps, lr=0.01), {"momentum": 0.9},
//     insert_zero="momentum_buffer")
// ```
const TORCH_SGD: [[f64; 3]; 5] = [
    [0.969, -1.988, 0.4795],
    [0.963031, -2.026012, 0.5390205],
    [0.9820679689999999, -2.033985988, 0.5084814795],
    [0.9584155867247999, -1.9995353884095999, 0.4605895758664],
    [0.92836171020774, -1.982930220467512, 0.44111839093546684],
];
const TORCH_RMSPROP: [[f64; 3]; 5] = [
    [0.9000000333333222, -1.9000000999999, 0.40000004999997507],
    [0.8834795737804585, -1.9970428726686518, 0.49491583456021226],
    [0.9388042226222734, -2.020731769073885, 0.45186514970221886],
    [0.9074191550066734, -1.9654830060863278, 0.379200700640143],
    [0.8630683341975359, -1.9451786810639216, 0.3516648393462278],
];

#[test]
fn sgd_momentum_switched_on_after_steps_matches_pytorch() {
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.0,
        dampening: 0.2,
        weight_decay: 0.01,
        ..Default::default()
    };
    for tensor_path in [false, true] {
        // Through the generic guarded update and through set_momentum.
        for via_set_momentum in [false, true] {
            let v = var();
            let mut opt = Sgd::new(vec![v.clone()], cfg).unwrap();
            opt.set_tensor_path(tensor_path);
            let got = run(opt, &v, |o| {
                if via_set_momentum {
                    o.set_momentum(0, 0.9).unwrap();
                } else {
                    o.update_rule(0, |c| c.momentum = 0.9).unwrap();
                }
                // The buffer exists but holds nothing until the next update.
                assert!(o
                    .state_tensor("param.0", "momentum_buffer")
                    .unwrap()
                    .is_none());
            });
            assert_close_slice(
                &got.concat(),
                &TORCH_SGD.concat(),
                TOL,
                &format!("SGD, 3 values a step, tensor_path={tensor_path}"),
            );
        }
    }
}

#[test]
fn rmsprop_momentum_switched_on_after_steps_starts_from_zero() {
    for tensor_path in [false, true] {
        let v = var();
        let cfg = RmsPropConfig {
            lr: 0.01,
            ..Default::default()
        };
        let mut opt = RmsProp::new(vec![v.clone()], cfg).unwrap();
        opt.set_tensor_path(tensor_path);
        let got = run(opt, &v, |o| o.set_momentum(0, 0.9).unwrap());
        assert_close_slice(
            &got.concat(),
            &TORCH_RMSPROP.concat(),
            TOL,
            &format!("RMSprop, 3 values a step, tensor_path={tensor_path}"),
        );
    }
}

#[test]
fn amsgrad_switched_on_mid_run_does_not_panic() {
    let v = var();
    let mut opt = Adam::new(vec![v.clone()], AdamConfig::default()).unwrap();
    opt.step(&grads(&v, 0)).unwrap();
    opt.update_rule(0, |c| c.amsgrad = true).unwrap();
    opt.step(&grads(&v, 1)).unwrap();
    let vmax = opt.state_tensor("param.0", "max_exp_avg_sq").unwrap();
    let v2 = opt.state_tensor("param.0", "exp_avg_sq").unwrap();
    // max(0, v) = v on the first update of the new buffer.
    assert_eq!(
        vmax.unwrap().to_vec1::<f64>().unwrap(),
        v2.unwrap().to_vec1::<f64>().unwrap()
    );
    // Switching it off again would drop a buffer with data: refused.
    assert!(opt.update_rule(0, |c| c.amsgrad = false).is_err());
}

#[test]
fn invalid_change_is_an_error_that_leaves_the_optimizer_unchanged() {
    let v = var();
    let cfg = SgdConfig {
        lr: 0.1,
        momentum: 0.9,
        ..Default::default()
    };
    let mut opt = Sgd::new(vec![v.clone()], cfg).unwrap();
    opt.step(&grads(&v, 0)).unwrap();
    let before = opt.state_bytes().unwrap();
    let check = |opt: &Sgd, e: OptimError, needle: &str| {
        assert!(e.to_string().contains(needle), "{e}");
        assert_eq!(opt.rule(0), Some(&cfg));
        assert_eq!(
            opt.state_bytes().unwrap(),
            before,
            "state changed by a refused change"
        );
    };
    let e = opt.update_rule(0, |c| c.lr = -1.0).unwrap_err();
    check(&opt, e, "`lr`");
    let e = opt
        .update_rule(0, |c| c.weight_decay = f64::NAN)
        .unwrap_err();
    check(&opt, e, "weight_decay");
    let e = opt
        .update_rule(0, |c| {
            c.nesterov = true;
            c.dampening = 0.5;
        })
        .unwrap_err();
    check(&opt, e, "nesterov");
    let e = opt.set_group_lr(0, f64::INFINITY).unwrap_err();
    check(&opt, e, "`lr`");
    let e = opt.set_momentum(0, -0.5).unwrap_err();
    check(&opt, e, "momentum");
    let e = opt.update_rule(3, |c| c.lr = 0.5).unwrap_err();
    check(&opt, e, "no parameter group 3");
    let e = opt.set_group_lr(1, 0.5).unwrap_err();
    check(&opt, e, "group 1");
    let e = opt.set_initial_lr(0, -0.1).unwrap_err();
    check(&opt, e, "initial_lr");
    // Dropping the momentum buffer the parameter holds.
    let e = opt.update_rule(0, |c| c.momentum = 0.0).unwrap_err();
    check(&opt, e, "momentum_buffer");
    // The optimizer still steps normally.
    opt.step(&grads(&v, 1)).unwrap();
    assert_eq!(opt.step_count("param.0"), 2);
}

#[test]
fn a_buffer_never_updated_can_be_dropped_again() {
    let v = var();
    let mut opt = Sgd::new(vec![v.clone()], SgdConfig::default()).unwrap();
    opt.step(&grads(&v, 0)).unwrap();
    let plain = opt.state_bytes().unwrap();
    opt.set_momentum(0, 0.9).unwrap();
    // Nothing was learnt into it yet: back to 0 is fine, and leaves exactly
    // the state of before.
    opt.set_momentum(0, 0.0).unwrap();
    assert_eq!(opt.state_bytes().unwrap(), plain);
}

#[test]
fn lr_set_through_the_api_is_not_reverted() {
    let v = var();
    let cfg = SgdConfig {
        lr: 0.1,
        ..Default::default()
    };
    let mut opt = Sgd::new(vec![v.clone()], cfg).unwrap();
    let x0 = values(&v);
    opt.set_group_lr(0, 0.05).unwrap();
    opt.step(&grads(&v, 0)).unwrap();
    let x1 = values(&v);
    for j in 0..3 {
        assert_eq!(x1[j], x0[j] - 0.05 * GRADS[0][j], "element {j}");
    }
    assert_eq!(opt.rule(0).unwrap().lr, 0.05);
    assert_eq!(opt.learning_rate(), 0.05);
    opt.update_rule(0, |c| c.lr = 0.025).unwrap();
    opt.step(&grads(&v, 1)).unwrap();
    let x2 = values(&v);
    for j in 0..3 {
        assert_eq!(x2[j], x1[j] - 0.025 * GRADS[1][j], "element {j}");
    }
    assert_eq!(opt.group_lr(0), Some(0.025));
    // The saved state carries the lr once, inside the hyperparameters.
    let bytes = opt.state_bytes().unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let groups = &header.metadata().as_ref().unwrap()["minibatch.groups"];
    assert_eq!(groups.matches("\"lr\"").count(), 1, "{groups}");
    let groups: serde_json::Value = serde_json::from_str(groups).unwrap();
    assert_eq!(groups[0]["hyperparameters"]["lr"], 0.025);
}

#[test]
fn a_new_buffer_survives_a_save_and_load() {
    let cfg = SgdConfig {
        lr: 0.1,
        dampening: 0.2,
        ..Default::default()
    };
    // Straight run: momentum switched on before the third step.
    let v = var();
    let straight = run(Sgd::new(vec![v.clone()], cfg).unwrap(), &v, |o| {
        o.set_momentum(0, 0.9).unwrap()
    });
    // Same, saved right after the switch (the buffer holds nothing yet) and
    // resumed into a fresh optimizer built with momentum 0.
    let w = var();
    let mut a = Sgd::new(vec![w.clone()], cfg).unwrap();
    a.step(&grads(&w, 0)).unwrap();
    a.step(&grads(&w, 1)).unwrap();
    a.set_momentum(0, 0.9).unwrap();
    let bytes = a.state_bytes().unwrap();
    let (_, header) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
    let groups = &header.metadata().as_ref().unwrap()["minibatch.groups"];
    assert!(
        groups.contains("\"new_buffers\":{\"param.0\":[\"momentum_buffer\"]}"),
        "{groups}"
    );
    let resumed = Var::new(values(&w), &Device::Cpu).unwrap();
    let mut b = Sgd::new(vec![resumed.clone()], cfg).unwrap();
    b.load_state_bytes(&bytes).unwrap();
    assert_eq!(b.momentum(0), Some(0.9));
    for (i, want) in straight.iter().enumerate().skip(2) {
        b.step(&grads(&resumed, i)).unwrap();
        assert_eq!(&values(&resumed), want, "step {i}");
    }
}
