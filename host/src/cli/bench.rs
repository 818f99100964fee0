//! `oxbox bench`: decode + preprocess timings on one file, in the same shape
//! as `cxr_reference.py bench`, so the two can be compared side by side.

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;
use candle_core::Device;
use oxbox::dicom::{self, DicomFile, ImageHeader};
use oxbox::model::{Model, ModelPackage};

/// Arguments of `oxbox bench`.
#[derive(Debug, clap::Args)]
#[command(
    args_conflicts_with_subcommands = true,
    subcommand_negates_reqs = true,
    after_help = "Examples:\n  oxbox bench --dicom RG1_UNCR.dcm --runs 20\n  \
oxbox bench --dicom RG1_UNCR.dcm --model models/demo --threads 2 --batch 1,2,4,8\n  \
oxbox bench --url http://127.0.0.1:8480 --dicom RG1_UNCR.dcm --emr record.json --requests 200 --concurrency 16\n  \
oxbox bench --train resnet18 --size 224 --batch 16 --steps 5 --threads 2\n  \
oxbox bench --layers resnet18 --size 224 --threads 2\n  \
oxbox bench --dicom RG1_UNCR.dcm --model models/demo --device cuda:0 --batch 1,8,32\n  \
oxbox bench federation-round --sites 20 --backbone resnet18 --percentile 10\n\n\
Prints JSON: median and minimum milliseconds for decode (read + parse + pixel decode), \
preprocess (canonical v1 on decoded pixels) and both together; with --model, the model's \
forward pass at batch 1 and end to end (read to probabilities), and with --batch the forward pass per case at each batch size. Compare with \
`cxr_reference.py bench FILE` run in the same session (scripts/bench.sh does both). With \
--url, load-tests a running server instead: latency percentiles and throughput. With --train, \
measures training throughput (cases/s) instead. --device (default: model.device) runs --model and \
--train on that device, e.g. cuda:0 (scripts/gpu-check.sh). With --layers, times each convolution of the \
backbone on each CPU kernel path (im2col + gemm, Winograd) instead."
)]
pub struct Args {
    /// A benchmark of its own (instead of the options below).
    #[command(subcommand)]
    pub what: Option<BenchCommand>,
    /// The DICOM file.
    #[arg(long, value_name = "FILE", required_unless_present_any = ["train", "layers"])]
    pub dicom: Option<PathBuf>,
    /// Instead: training throughput of this backbone (tiny, resnet18,
    /// resnet34) at --size: --steps optimizer steps of --batch synthetic
    /// cases (augmentation, forward, backward, AdamW).
    #[arg(long, value_name = "BACKBONE", conflicts_with_all = ["dicom", "url", "model"])]
    pub train: Option<oxbox::model::Backbone>,
    /// Instead: time each convolution of this backbone's image branch at
    /// --size (batch --batch, default 1), --runs times per kernel path.
    #[arg(long, value_name = "BACKBONE", conflicts_with_all = ["dicom", "url", "model", "train"])]
    pub layers: Option<oxbox::model::Backbone>,
    /// Optimizer steps timed, with --train (after one warm-up step).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub steps: u32,
    /// Output side S.
    #[arg(long, default_value_t = 224)]
    pub size: u32,
    /// Timed runs per stage (after one warm-up run).
    #[arg(long, default_value_t = 20, value_parser = clap::value_parser!(u32).range(1..=10_000))]
    pub runs: u32,
    /// Also time the model: forward pass at batch 1 on the preprocessed
    /// image, and end to end (read, decode, preprocess, forward), as the
    /// reference times ONNX Runtime.
    #[arg(long, value_name = "DIR")]
    pub model: Option<PathBuf>,
    /// CPU threads for the model (default: model.threads from the config,
    /// 0 = one per core).
    #[arg(long, value_name = "N")]
    pub threads: Option<usize>,
    /// Compute device for --model and --train: `cpu` or `cuda:N` (a build
    /// with the `cuda` feature); default: model.device from the config.
    #[arg(long, value_name = "DEVICE")]
    pub device: Option<String>,
    /// With --model, also time a forward pass over this many copies of the
    /// image at once (what the server's batching runs), per case; a list
    /// (`--batch 2,4,8`) times each. With --train, the training batch
    /// (one value; default 16).
    #[arg(long, value_name = "N[,N…]", value_delimiter = ',',
          value_parser = clap::value_parser!(u32).range(1..=64))]
    pub batch: Vec<u32>,
    /// Instead: load-test a running `oxbox serve` at this base URL, POSTing
    /// --dicom and --emr to /v1/predict.
    #[arg(long, value_name = "URL", requires = "emr")]
    pub url: Option<String>,
    /// The EMR record sent with --url.
    #[arg(long, value_name = "RECORD.json")]
    pub emr: Option<PathBuf>,
    /// Requests in all, with --url.
    #[arg(long, default_value_t = 200, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
    pub requests: u32,
    /// Clients sending at once (each waits for its answer), with --url.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=1024))]
    pub concurrency: u32,
    /// File with the bearer token, with --url.
    #[arg(long, value_name = "FILE")]
    pub token_file: Option<PathBuf>,
    /// The CPU kernels' vector instructions at most: `avx2` times the AVX2
    /// path on an AVX-512 machine, `portable` the plain loops (default:
    /// the widest the CPU runs). Reports name the path they ran.
    #[arg(long, value_name = "ISA", value_enum)]
    pub isa: Option<oxbox::model::vector_isa::VectorIsa>,
}

/// `oxbox bench …` benchmarks with options of their own.
#[derive(Debug, clap::Subcommand)]
pub enum BenchCommand {
    /// One federated round without training, on a real aggregator: filter,
    /// shard, sign, upload, verify, aggregate, publish.
    FederationRound(super::bench_federation::Args),
}

pub(crate) fn stats(mut ms: Vec<f64>) -> serde_json::Value {
    ms.sort_by(f64::total_cmp);
    let median = if ms.len() % 2 == 1 {
        ms[ms.len() / 2]
    } else {
        (ms[ms.len() / 2 - 1] + ms[ms.len() / 2]) / 2.0
    };
    let round = |v: f64| (v * 1000.0).round() / 1000.0;
    serde_json::json!({ "median_ms": round(median), "min_ms": round(ms[0]) })
}

/// Runs `oxbox bench`.
pub fn run(args: Args, config: Option<&Path>) -> anyhow::Result<()> {
    if let Some(BenchCommand::FederationRound(round)) = args.what {
        return super::bench_federation::run(round);
    }
    let loaded = super::load_config(config)?.config;
    oxbox::model::set_compute_threads(args.threads.unwrap_or(loaded.model.threads));
    if let Some(isa) = args.isa {
        oxbox::model::vector_isa::cap(isa);
    }
    let isa = oxbox::model::vector_isa::active().name();
    // The device is chosen only where it is used (--model, --train).
    let device_name = args.device.as_deref().unwrap_or(&loaded.model.device);
    let device = || -> anyhow::Result<Device> {
        let spec = oxbox::config::parse_device(device_name)
            .with_context(|| format!("device {device_name:?}: use \"cpu\" or \"cuda:N\""))?;
        Ok(oxbox::model::select_device(spec)?)
    };
    if let Some(backbone) = args.train {
        return train_throughput(backbone, &args, &device()?, device_name, isa);
    }
    if let Some(backbone) = args.layers {
        let batch = single_batch(&args, 1, "--layers")?;
        let layers = oxbox::model::conv_bench::time_layers(
            backbone,
            args.size as usize,
            batch,
            args.runs as usize,
        )?;
        let sum = |f: fn(&oxbox::model::conv_bench::LayerTiming) -> f64| {
            (layers.iter().map(f).sum::<f64>() * 1000.0).round() / 1000.0
        };
        println!(
            "{}",
            serde_json::to_string_pretty(&serde_json::json!({
                "layers": backbone,
                "input_size": args.size,
                "batch": batch,
                "threads": oxbox::model::compute_threads(),
                "isa": isa,
                "total_im2col_ms": sum(|l| l.im2col_ms),
                "total_gemm_ms": sum(|l| l.gemm_ms),
                "total_chosen_ms": sum(|l| l.chosen_ms),
                "convolutions": layers,
            }))?
        );
        return Ok(());
    }
    let dicom_path = args
        .dicom
        .clone()
        .context("--dicom FILE is required (unless --train)")?;
    if args.url.is_some() {
        return super::bench_http::run(&args, &dicom_path);
    }
    let limits = loaded.limits;
    let what = || format!("{}", dicom_path.display());
    // What the reference's "decode" times: read, parse, decode frame 1.
    let decode = || -> anyhow::Result<usize> {
        let file = DicomFile::open(&dicom_path, &limits)?;
        let geometry = ImageHeader::read(&file)?.accept(&limits)?;
        let frame = dicom::pixels::decode_first_frame(&file, &geometry)?;
        Ok(std::hint::black_box(frame.rows as usize))
    };
    let file = DicomFile::open(&dicom_path, &limits).with_context(what)?;
    let header = ImageHeader::read(&file).with_context(what)?;
    let geometry = header.accept(&limits).with_context(what)?;
    let frame = dicom::pixels::decode_first_frame(&file, &geometry).with_context(what)?;
    let mut decode_ms = Vec::new();
    let mut preprocess_ms = Vec::new();
    let mut total_ms = Vec::new();
    for _ in 0..=args.runs {
        let t = Instant::now();
        decode()?;
        decode_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        std::hint::black_box(dicom::canonical::preprocess(
            &header, &geometry, &frame, args.size,
        ));
        preprocess_ms.push(t.elapsed().as_secs_f64() * 1e3);
        let t = Instant::now();
        std::hint::black_box(dicom::preprocess_file(&dicom_path, args.size, &limits)?);
        total_ms.push(t.elapsed().as_secs_f64() * 1e3);
    }
    // The first round warms caches and is not counted.
    for v in [&mut decode_ms, &mut preprocess_ms, &mut total_ms] {
        v.remove(0);
    }
    let mut report = serde_json::json!({
        "file": dicom_path.file_name().map(|n| n.to_string_lossy().into_owned()),
        "decode": stats(decode_ms),
        "preprocess": stats(preprocess_ms),
        "decode_plus_preprocess": stats(total_ms),
    });
    if let Some(dir) = &args.model {
        let model = Model::load(ModelPackage::load(dir)?, &device()?)?;
        report["device"] = device_name.into();
        report["isa"] = isa.into();
        let size = model.package().manifest.input_size;
        let image = dicom::preprocess_file(&dicom_path, size, &limits).with_context(what)?;
        let features = Vec::new();
        let forward = || model.predict(Some(&image.data), &features);
        for _ in 0..3 {
            forward()?;
        }
        // Timed as the reference times ONNX Runtime: the forward pass in a
        // loop of its own, then the whole way from the file in another.
        let mut forward_ms = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            std::hint::black_box(forward()?);
            forward_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let mut end_to_end_ms = Vec::new();
        for _ in 0..args.runs {
            let t = Instant::now();
            let image = dicom::preprocess_file(&dicom_path, size, &limits)?;
            std::hint::black_box(model.predict(Some(&image.data), &features)?);
            end_to_end_ms.push(t.elapsed().as_secs_f64() * 1e3);
        }
        let backbone =
            format!("{:?}", model.package().manifest.architecture.backbone).to_lowercase();
        let threads = oxbox::model::compute_threads();
        report[format!("candle_{backbone}_b1_threads{threads}")] = stats(forward_ms);
        report["end_to_end"] = stats(end_to_end_ms);
        for &batch in &args.batch {
            let cases = vec![
                oxbox::model::ModelInput {
                    image: Some(image.data.clone()),
                    features: Vec::new(),
                };
                batch as usize
            ];
            model.predict_batch(&cases)?;
            let mut batch_ms = Vec::new();
            for _ in 0..args.runs {
                let t = Instant::now();
                std::hint::black_box(model.predict_batch(&cases)?);
                batch_ms.push(t.elapsed().as_secs_f64() * 1e3 / f64::from(batch));
            }
            report[format!("candle_{backbone}_b{batch}_threads{threads}_per_case")] =
                stats(batch_ms);
        }
    }
    println!("{}", serde_json::to_string_pretty(&report)?);
    Ok(())
}

/// The one `--batch` size a mode that times a single batch takes (`default`
/// without the option).
fn single_batch(args: &Args, default: usize, mode: &str) -> anyhow::Result<usize> {
    match args.batch.as_slice() {
        [] => Ok(default),
        [one] => Ok(*one as usize),
        _ => anyhow::bail!("{mode} takes one --batch size"),
    }
}

/// `oxbox bench --train BACKBONE`: training cases per second on `device`.
fn train_throughput(
    backbone: oxbox::model::Backbone,
    args: &Args,
    device: &Device,
    device_name: &str,
    isa: &str,
) -> anyhow::Result<()> {
    let batch = single_batch(args, 16, "--train")?;
    let cases_per_second =
        oxbox::train::measure_throughput(backbone, args.size, batch, args.steps as usize, device)?;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "train": backbone,
            "device": device_name,
            "input_size": args.size,
            "batch": batch,
            "steps": args.steps,
            "threads": oxbox::model::compute_threads(),
            "isa": isa,
            "cases_per_second": (cases_per_second * 100.0).round() / 100.0,
        }))?
    );
    Ok(())
}
