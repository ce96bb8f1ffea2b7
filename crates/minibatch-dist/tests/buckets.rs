//! The gradient buckets and the collectives without MPI: `Single`, and a
//! simulated group of N ranks whose other ranks hold known gradients.

use std::sync::Mutex;

use candle_core::backprop::GradStore;
use candle_core::{DType, Device, Tensor, Var};
use half::bf16;
use minibatch_dist::threads::{configure_threads, cpu_time, threads_per_rank};
use minibatch_dist::{
    broadcast_vars, checksum, Buffer, DistError, GradBuckets, ProcessGroup, ProcessGroupExt,
    ReduceOp, Result, Single,
};

/// World of `world` ranks where every other rank holds `other * x` for this
/// rank's `x`: a sum is `x * (1 + (world - 1) * other)`. Counts the collectives.
#[derive(Debug)]
struct Simulated {
    world: usize,
    other: f64,
    calls: Mutex<Vec<usize>>,
}

impl Simulated {
    fn new(world: usize, other: f64) -> Self {
        Self {
            world,
            other,
            calls: Mutex::new(Vec::new()),
        }
    }
    fn factor(&self) -> f64 {
        1.0 + (self.world - 1) as f64 * self.other
    }
}

impl ProcessGroup for Simulated {
    fn rank(&self) -> usize {
        0
    }
    fn world_size(&self) -> usize {
        self.world
    }
    fn local_size(&self) -> usize {
        self.world
    }
    fn backend(&self) -> &'static str {
        "simulated"
    }
    fn all_reduce(&self, buf: Buffer<'_>, op: ReduceOp) -> Result<()> {
        self.calls.lock().unwrap().push(buf.len());
        let mut f = self.factor();
        if op == ReduceOp::Mean {
            f /= self.world as f64;
        }
        match buf {
            Buffer::F32(x) => x.iter_mut().for_each(|v| *v = (*v as f64 * f) as f32),
            Buffer::F64(x) => x.iter_mut().for_each(|v| *v *= f),
            Buffer::BF16(x) => x
                .iter_mut()
                .for_each(|v| *v = bf16::from_f64(v.to_f64() * f)),
        }
        Ok(())
    }
    fn broadcast_bytes(&self, _buf: &mut [u8], _root: usize) -> Result<()> {
        Ok(())
    }
    fn barrier(&self) -> Result<()> {
        Ok(())
    }
    fn all_gather_u64(&self, value: u64) -> Result<Vec<u64>> {
        Ok(vec![value; self.world])
    }
    fn all_reduce_tensor(&self, _t: &Tensor, _op: ReduceOp) -> Result<()> {
        unimplemented!("not used by the buckets on the CPU")
    }
    fn broadcast_tensor(&self, _t: &Tensor, _root: usize) -> Result<()> {
        Ok(())
    }
    fn abort(&self, code: i32) -> ! {
        std::process::exit(code)
    }
}

fn var(n: usize, dtype: DType, start: f32) -> Var {
    let t = Tensor::arange(start, start + n as f32, &Device::Cpu).unwrap();
    Var::from_tensor(&t.to_dtype(dtype).unwrap()).unwrap()
}

fn grads_of(vars: &[Var]) -> GradStore {
    // d/dv sum(v * v) = 2v
    let mut loss = Tensor::zeros((), DType::F64, &Device::Cpu).unwrap();
    for v in vars {
        let s = v
            .as_tensor()
            .sqr()
            .unwrap()
            .sum_all()
            .unwrap()
            .to_dtype(DType::F64)
            .unwrap();
        loss = (loss + s).unwrap();
    }
    loss.backward().unwrap()
}

fn f64s(t: &Tensor) -> Vec<f64> {
    t.to_dtype(DType::F64)
        .unwrap()
        .flatten_all()
        .unwrap()
        .to_vec1()
        .unwrap()
}

#[test]
fn buckets_follow_size_and_dtype() {
    let vars = [
        var(100, DType::F32, 0.0),
        var(100, DType::F32, 0.0),
        var(300, DType::F32, 0.0), // larger than a bucket: its own
        var(10, DType::F64, 0.0),  // another wire type: a new bucket
        var(10, DType::BF16, 0.0), // bf16 travels in f32
        var(10, DType::F32, 0.0),
    ];
    let b = GradBuckets::new(&vars, 1000).unwrap(); // 250 f32
    assert_eq!(b.bucket_lens(), vec![200, 300, 10, 20]);
    assert_eq!(
        GradBuckets::with_default_size(&vars).unwrap().num_buckets(),
        3
    );
    assert!(matches!(
        GradBuckets::new(&vars, 0),
        Err(DistError::InvalidArgument(_))
    ));
    let u = Var::from_tensor(&Tensor::zeros(3, DType::U32, &Device::Cpu).unwrap()).unwrap();
    let err = GradBuckets::new(&[vars[0].clone(), u], 1000).unwrap_err();
    assert!(
        matches!(
            err,
            DistError::UnsupportedDType {
                index: 1,
                dtype: DType::U32
            }
        ),
        "{err}"
    );
}

#[test]
fn mean_over_a_simulated_world_in_one_collective_per_bucket() {
    let vars = [
        var(100, DType::F32, 1.0),
        var(300, DType::F32, -50.0),
        var(7, DType::F64, 0.5),
        var(5, DType::BF16, 2.0),
    ];
    let group = Simulated::new(4, 3.0); // others hold 3x: mean = x * (1 + 9) / 4
    let mut buckets = GradBuckets::new(&vars, 1000).unwrap();
    let mut grads = grads_of(&vars);
    let before: Vec<Vec<f64>> = vars
        .iter()
        .map(|v| f64s(grads.get(v.as_tensor()).unwrap()))
        .collect();
    // the gradient tensors are written in place: the same storage afterwards
    let ids: Vec<_> = vars
        .iter()
        .map(|v| grads.get(v.as_tensor()).unwrap().id())
        .collect();
    buckets.all_reduce_mean(&group, &mut grads).unwrap();
    assert_eq!(*group.calls.lock().unwrap(), buckets.bucket_lens());
    let f = group.factor() / 4.0;
    for (i, v) in vars.iter().enumerate() {
        let g = grads.get(v.as_tensor()).unwrap();
        assert_eq!(
            g.id(),
            ids[i],
            "param {i}: gradient replaced, not written in place"
        );
        assert_eq!(g.dtype(), v.dtype());
        let want: Vec<f64> = before[i].iter().map(|b| b * f).collect();
        let rel = if v.dtype() == DType::BF16 { 1e-2 } else { 1e-6 };
        // |a - b·f| ≤ rel·|b| = (rel / |f|)·|b·f|, element by element.
        let tol = minibatch_testkit::Tol::rel(rel / f.abs());
        minibatch_testkit::assert_close_slice(&f64s(g), &want, tol, &format!("param {i}"));
    }
    assert_eq!(buckets.stats().steps, 1);
}

#[test]
fn a_missing_gradient_contributes_zeros_and_comes_back() {
    let vars = [var(4, DType::F32, 1.0), var(3, DType::F32, 1.0)];
    let group = Simulated::new(2, 1.0);
    let mut buckets = GradBuckets::new(&vars, 1 << 20).unwrap();
    let mut grads = grads_of(&vars[..1]);
    assert!(grads.get(vars[1].as_tensor()).is_none());
    buckets.all_reduce_mean(&group, &mut grads).unwrap();
    assert_eq!(
        f64s(grads.get(vars[0].as_tensor()).unwrap()),
        [2.0, 4.0, 6.0, 8.0]
    );
    assert_eq!(f64s(grads.get(vars[1].as_tensor()).unwrap()), [0.0; 3]);
}

#[test]
fn a_strided_gradient_is_reduced_too() {
    let v = Var::from_tensor(
        &Tensor::arange(0f32, 6.0, &Device::Cpu)
            .unwrap()
            .reshape((2, 3))
            .unwrap(),
    )
    .unwrap();
    let group = Simulated::new(2, 1.0);
    let mut buckets = GradBuckets::new(std::slice::from_ref(&v), 1 << 20).unwrap();
    let mut grads = grads_of(std::slice::from_ref(&v));
    // replace the gradient by a transposed (strided) view of the same values
    let g = grads.get(v.as_tensor()).unwrap().clone();
    let strided = g.t().unwrap().contiguous().unwrap().t().unwrap();
    assert!(!strided.is_contiguous());
    grads.insert(v.as_tensor(), strided);
    buckets.all_reduce_mean(&group, &mut grads).unwrap();
    assert_eq!(f64s(grads.get(v.as_tensor()).unwrap()), f64s(&g));
}

#[test]
fn a_wrong_gradient_shape_is_an_error() {
    let v = var(4, DType::F32, 0.0);
    let mut buckets = GradBuckets::new(std::slice::from_ref(&v), 1 << 20).unwrap();
    let mut grads = grads_of(std::slice::from_ref(&v));
    grads.insert(
        v.as_tensor(),
        Tensor::zeros(5, DType::F32, &Device::Cpu).unwrap(),
    );
    let err = buckets
        .all_reduce_mean(&Simulated::new(2, 1.0), &mut grads)
        .unwrap_err();
    assert!(err.to_string().contains("has shape [5]"), "{err}");
}

#[test]
fn single_is_rank_0_of_1_and_changes_nothing() {
    let g = Single;
    assert_eq!(
        (g.rank(), g.world_size(), g.local_size(), g.backend()),
        (0, 1, 1, "single")
    );
    let mut x = [1.5f32, -2.0];
    g.all_reduce_sum(&mut x).unwrap();
    g.all_reduce_mean(&mut x).unwrap();
    assert_eq!(x, [1.5, -2.0]);
    assert_eq!(g.all_gather_f64(0.5).unwrap(), vec![0.5]);
    g.check_same("anything", 3).unwrap();
    assert!(matches!(
        g.broadcast(&mut x, 1),
        Err(DistError::InvalidRoot {
            root: 1,
            world_size: 1
        })
    ));
    let v = var(3, DType::F32, 0.0);
    broadcast_vars(&g, std::slice::from_ref(&v), 0).unwrap();
    assert!(broadcast_vars(&g, std::slice::from_ref(&v), 1).is_err());
    let mut buckets = GradBuckets::with_default_size(std::slice::from_ref(&v)).unwrap();
    let mut grads = grads_of(std::slice::from_ref(&v));
    buckets.all_reduce_mean(&g, &mut grads).unwrap();
    assert_eq!(f64s(grads.get(v.as_tensor()).unwrap()), [0.0, 2.0, 4.0]);
    assert_eq!(buckets.stats().steps, 0); // nothing to reduce with one rank
}

#[test]
fn check_same_names_the_first_rank_that_differs() {
    #[derive(Debug)]
    struct Gather(Vec<u64>);
    impl ProcessGroup for Gather {
        fn rank(&self) -> usize {
            0
        }
        fn world_size(&self) -> usize {
            self.0.len()
        }
        fn local_size(&self) -> usize {
            1
        }
        fn backend(&self) -> &'static str {
            "gather"
        }
        fn all_reduce(&self, _: Buffer<'_>, _: ReduceOp) -> Result<()> {
            Ok(())
        }
        fn broadcast_bytes(&self, _: &mut [u8], _: usize) -> Result<()> {
            Ok(())
        }
        fn barrier(&self) -> Result<()> {
            Ok(())
        }
        fn all_gather_u64(&self, _: u64) -> Result<Vec<u64>> {
            Ok(self.0.clone())
        }
        fn all_reduce_tensor(&self, _: &Tensor, _: ReduceOp) -> Result<()> {
            Ok(())
        }
        fn broadcast_tensor(&self, _: &Tensor, _: usize) -> Result<()> {
            Ok(())
        }
        fn abort(&self, code: i32) -> ! {
            std::process::exit(code)
        }
    }
    let err = Gather(vec![4, 4, 5, 6])
        .check_same("batches per epoch", 4)
        .unwrap_err();
    assert_eq!(
        err.to_string(),
        "rank 2 has batches per epoch = 5 where rank 0 has 4: every rank must agree"
    );
    Gather(vec![4, 4]).check_same("x", 4).unwrap();
}

#[test]
fn checksum_sees_values_shape_and_dtype() {
    let a = Tensor::new(&[1f32, 2.0, 3.0, 4.0], &Device::Cpu).unwrap();
    let c = |ts: &[&Tensor]| checksum(ts).unwrap();
    assert_eq!(c(&[&a]), c(&[&a.copy().unwrap()]));
    assert_ne!(c(&[&a]), c(&[&a.reshape((2, 2)).unwrap()]));
    assert_ne!(c(&[&a]), c(&[&a.to_dtype(DType::F64).unwrap()]));
    assert_ne!(c(&[&a]), c(&[&(a.clone() + 1e-6).unwrap()]));
}

#[test]
fn threads_split_the_cores_and_cpu_time_grows() {
    let cores = std::thread::available_parallelism().unwrap().get();
    assert!(threads_per_rank(1) >= 1);
    assert!(threads_per_rank(cores * 4) == 1);
    // an explicit count wins and is what candle's pool will read
    assert_eq!(configure_threads(2, Some(3)), 3);
    assert_eq!(std::env::var("CANDLE_NUM_THREADS").unwrap(), "3");
    let t0 = cpu_time();
    let mut x = 0u64;
    for i in 0..20_000_000u64 {
        x = x.wrapping_mul(31).wrapping_add(i);
    }
    std::hint::black_box(x);
    assert!(cpu_time() > t0, "no CPU time counted");
}
