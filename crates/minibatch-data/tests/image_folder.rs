//! ImageFolder: pixels against the PNG/JPEG files written here, every
//! transform against a hand computation (with the documented random draws),
//! the same batches with 0, 2 or 3 workers and after resuming, and typed
//! errors / the skip policy for unreadable images.

use std::path::Path;

use minibatch_data::rng::{below, derive_rng, unit_f64};
use minibatch_data::{DataError, DataLoader, Dataset, ImageErrorPolicy, ImageFolder, ImageOptions};

/// The test pattern: channel values of pixel (x, y) of image `k`.
fn pixel(k: u32, x: u32, y: u32) -> [u8; 3] {
    [(x * 9 + k) as u8, (y * 7) as u8, (x * y + 3 * k) as u8]
}

fn png(path: &Path, k: u32, w: u32, h: u32) {
    image::RgbImage::from_fn(w, h, |x, y| image::Rgb(pixel(k, x, y)))
        .save(path)
        .unwrap();
}

/// root/a/{0,1,2}.png (k = 0, 1, 2), root/b/{3.png, sub/4.PNG}, root/b/notes.txt: 20x16 RGB.
fn make_folder(root: &Path) {
    for d in ["a", "b", "b/sub"] {
        std::fs::create_dir_all(root.join(d)).unwrap();
    }
    for k in 0..3 {
        png(&root.join(format!("a/{k}.png")), k, 20, 16);
    }
    png(&root.join("b/3.png"), 3, 20, 16);
    png(&root.join("b/sub/4.PNG"), 4, 20, 16);
    std::fs::write(root.join("b/notes.txt"), "not an image").unwrap();
}

/// Values of `(C, H, W)` `t` at channel `c`, row `y`, column `x`.
fn at(t: &[Vec<Vec<f32>>], c: usize, y: usize, x: usize) -> f32 {
    t[c][y][x]
}

#[test]
fn lists_classes_and_reads_exact_pixels() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let ds = ImageFolder::open(dir.path(), ImageOptions::default()).unwrap();
    assert_eq!(ds.classes(), ["a", "b"]);
    assert_eq!(ds.len(), 5);
    let labels: Vec<u32> = ds.samples().iter().map(|s| s.1).collect();
    assert_eq!(labels, [0, 0, 0, 1, 1]);
    assert!(ds.samples()[4].0.ends_with("b/sub/4.PNG"));
    for (k, &label) in labels.iter().enumerate() {
        let (x, y) = ds.get(k).unwrap().into_pair().unwrap();
        assert_eq!(x.dims(), &[3, 16, 20]);
        assert_eq!(y.to_scalar::<u32>().unwrap(), label);
        let t = x.to_vec3::<f32>().unwrap();
        for (yy, xx) in [(0, 0), (5, 17), (15, 19)] {
            for c in 0..3 {
                let want = pixel(k as u32, xx as u32, yy as u32)[c] as f32 / 255.0;
                assert_eq!(at(&t, c, yy, xx), want);
            }
        }
    }
    let b = ds.get_batch(&[4, 1]).unwrap();
    let (x, y) = b.into_pair().unwrap();
    assert_eq!(x.dims(), &[2, 3, 16, 20]);
    assert_eq!(y.to_vec1::<u32>().unwrap(), [1, 0]);
    assert!(!ds.is_in_memory());
}

#[test]
fn transforms_match_a_hand_computation() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    let (mean, std) = ([0.5f32, 0.25, 0.0], [0.5f32, 2.0, 1.0]);
    let opts = ImageOptions::default()
        .center_crop(14)
        .random_crop(10)
        .hflip(0.5)
        .normalize(&mean, &std)
        .seed(77);
    let ds = ImageFolder::open(dir.path(), opts).unwrap();
    let mut flips = 0;
    for epoch in 0..4u64 {
        for k in 0..5usize {
            let (x, _) = ds.get_in_epoch(k, epoch).unwrap().into_pair().unwrap();
            assert_eq!(x.dims(), &[3, 10, 10]);
            let t = x.to_vec3::<f32>().unwrap();
            // Center crop 14 of 16x20: top round(1.0) = 1, left round(3.0) = 3.
            let mut rng = derive_rng(77, epoch, k as u64);
            let top = 1 + below(&mut rng, 5) as u32;
            let left = 3 + below(&mut rng, 5) as u32;
            let flip = unit_f64(&mut rng) < 0.5;
            flips += flip as u32;
            for y in 0..10u32 {
                for xo in 0..10u32 {
                    let sx = if flip { left + 9 - xo } else { left + xo };
                    let p = pixel(k as u32, sx, top + y);
                    for c in 0..3 {
                        let want = (p[c] as f32 / 255.0 - mean[c]) / std[c];
                        let got = at(&t, c, y as usize, xo as usize);
                        assert!((got - want).abs() < 1e-6, "{got} vs {want}");
                    }
                }
            }
        }
    }
    assert!(flips > 3 && flips < 17, "{flips} flips of 20");
    // Grayscale of a gray image keeps its value; resize of a constant image stays constant.
    let gray = tempfile::tempdir().unwrap();
    std::fs::create_dir(gray.path().join("g")).unwrap();
    image::RgbImage::from_pixel(30, 10, image::Rgb([51, 51, 51]))
        .save(gray.path().join("g/x.png"))
        .unwrap();
    let ds = ImageFolder::open(
        gray.path(),
        ImageOptions::default()
            .grayscale(true)
            .resize(8, 12)
            .normalize(&[0.1], &[0.5]),
    )
    .unwrap();
    let (x, _) = ds.get(0).unwrap().into_pair().unwrap();
    assert_eq!(x.dims(), &[1, 8, 12]);
    let v = x.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert!(
        v.iter().all(|&p| (p - (0.2 - 0.1) / 0.5).abs() < 1e-6),
        "{v:?}"
    );
}

#[test]
fn jpeg_decodes() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("c")).unwrap();
    for name in ["x.jpg", "y.JPEG"] {
        image::RgbImage::from_pixel(24, 24, image::Rgb([200, 30, 120]))
            .save(dir.path().join("c").join(name))
            .unwrap();
    }
    let ds = ImageFolder::open(dir.path(), ImageOptions::default()).unwrap();
    assert_eq!(ds.len(), 2);
    let (x, _) = ds.get_batch(&[0, 1]).unwrap().into_pair().unwrap();
    let t = x.to_vec3::<f32>().is_err();
    assert!(t, "a batch is 4-d");
    let mean: Vec<f32> = (0..3)
        .map(|c| {
            x.narrow(1, c, 1)
                .unwrap()
                .mean_all()
                .unwrap()
                .to_scalar::<f32>()
                .unwrap()
                * 255.0
        })
        .collect();
    for (got, want) in mean.iter().zip([200.0, 30.0, 120.0]) {
        assert!((got - want).abs() < 4.0, "{mean:?}");
    }
}

#[test]
fn workers_and_resume_give_the_same_batches() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::create_dir(dir.path().join("a")).unwrap();
    std::fs::create_dir(dir.path().join("b")).unwrap();
    for k in 0..23u32 {
        let class = if k % 3 == 0 { "a" } else { "b" };
        png(
            &dir.path().join(format!("{class}/{k:02}.png")),
            k,
            12 + k % 5,
            11,
        );
    }
    let opts = ImageOptions::default()
        .resize(10, 10)
        .random_crop(8)
        .hflip(0.5)
        .seed(3);
    let run = |workers: usize, epoch: u64, skip: usize| -> Vec<(Vec<f32>, Vec<u32>)> {
        let ds = ImageFolder::open(dir.path(), opts.clone()).unwrap();
        let loader = DataLoader::builder(ds)
            .batch_size(4)
            .shuffle(11)
            .num_workers(workers)
            .build()
            .unwrap();
        assert_eq!(loader.uses_workers(), workers > 0);
        loader
            .epoch(epoch)
            .skip_to(skip)
            .map(|b| {
                let (x, y) = b.unwrap().into_pair().unwrap();
                (
                    x.flatten_all().unwrap().to_vec1().unwrap(),
                    y.to_vec1().unwrap(),
                )
            })
            .collect()
    };
    for epoch in 0..2 {
        let base = run(0, epoch, 0);
        assert_eq!(base.len(), 6);
        for workers in [2, 3] {
            assert_eq!(run(workers, epoch, 0), base);
            assert_eq!(run(workers, epoch, 4), base[4..]);
        }
    }
    assert_ne!(run(0, 0, 0), run(0, 1, 0));
}

#[test]
fn unreadable_images_fail_or_are_skipped() {
    let dir = tempfile::tempdir().unwrap();
    make_folder(dir.path());
    std::fs::write(dir.path().join("a/1.png"), b"\x89PNG\r\n\x1a\n garbage").unwrap();
    std::fs::write(dir.path().join("a/2.png"), b"").unwrap();
    let ds = ImageFolder::open(dir.path(), ImageOptions::default()).unwrap();
    match ds.get_batch(&[0, 1]) {
        Err(DataError::Image { path, .. }) => assert!(path.ends_with("a/1.png")),
        other => panic!("{other:?}"),
    }
    let msg = ds.get(2).unwrap_err().to_string();
    assert!(msg.contains("2.png"), "{msg}");

    let skip = ImageFolder::open(
        dir.path(),
        ImageOptions::default().on_error(ImageErrorPolicy::Skip),
    )
    .unwrap();
    let (x, y) = skip.get_batch(&[0, 1, 3, 2]).unwrap().into_pair().unwrap();
    assert_eq!(x.dims()[0], 2);
    assert_eq!(y.to_vec1::<u32>().unwrap(), [0, 1]);
    assert_eq!(skip.skipped().len(), 2);
    assert!(matches!(
        skip.get_batch(&[1, 2]),
        Err(DataError::Image { .. })
    ));
    // Through the loader: every good image arrives exactly once.
    let loader = DataLoader::builder(skip)
        .batch_size(2)
        .shuffle(0)
        .num_workers(2)
        .build()
        .unwrap();
    let seen: usize = loader
        .epoch(0)
        .filter_map(|b| b.ok())
        .map(|b| b.len())
        .sum();
    assert_eq!(seen, 3);
}

#[test]
fn bad_layouts_and_options_are_typed_errors() {
    let dir = tempfile::tempdir().unwrap();
    assert!(matches!(
        ImageFolder::open(dir.path().join("missing"), ImageOptions::default()),
        Err(DataError::Io { .. })
    ));
    assert!(matches!(
        ImageFolder::open(dir.path(), ImageOptions::default()),
        Err(DataError::EmptyDataset(_))
    ));
    std::fs::create_dir(dir.path().join("empty")).unwrap();
    assert!(matches!(
        ImageFolder::open(dir.path(), ImageOptions::default()),
        Err(DataError::EmptyDataset(m)) if m.contains("empty")
    ));
    std::fs::remove_dir(dir.path().join("empty")).unwrap();
    std::fs::create_dir(dir.path().join("c")).unwrap();
    png(&dir.path().join("c/small.png"), 0, 6, 6);
    png(&dir.path().join("c/wide.png"), 0, 9, 6);
    for opts in [
        ImageOptions::default().hflip(1.5),
        ImageOptions::default().resize(0, 4),
        ImageOptions::default().random_crop(0),
        ImageOptions::default().normalize(&[0.5], &[0.5]),
        ImageOptions::default().normalize(&[0.5; 3], &[0.5, 0.0, 1.0]),
    ] {
        assert!(matches!(
            ImageFolder::open(dir.path(), opts),
            Err(DataError::InvalidConfig(_))
        ));
    }
    let ds = ImageFolder::open(dir.path(), ImageOptions::default().random_crop(8)).unwrap();
    match ds.get(0) {
        Err(DataError::Image { path, reason }) => {
            assert!(path.ends_with("small.png"));
            assert!(reason.contains("8x8"), "{reason}");
        }
        other => panic!("{other:?}"),
    }
    let ds = ImageFolder::open(dir.path(), ImageOptions::default()).unwrap();
    assert!(matches!(
        ds.get_batch(&[0, 1]),
        Err(DataError::ShapeMismatch(_))
    ));
    assert!(matches!(ds.get(2), Err(DataError::IndexOutOfRange { .. })));
    let ds = ImageFolder::open(dir.path(), ImageOptions::default().center_crop(6)).unwrap();
    assert_eq!(ds.get_batch(&[0, 1]).unwrap().len(), 2);
}
