//! `oxbox synth`: a multi-site synthetic cohort with known truth.

use std::path::PathBuf;
use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use oxbox::synth::{SynthOptions, generate};

/// Arguments of `oxbox synth`.
#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  oxbox synth --sites 5 --cases-per-site 400 --seed 7 --out cohorts/demo\n  \
oxbox synth --site-sizes 600,400,250,150,100 --seed 7 --out cohorts/federation\n\n\
Writes, per site, DIR/site-N/ with site.toml (conventions and the plugin that reads the site), \
cases.csv (the site's own EMR export: column names, units, codes, missingness; fake patient \
name, ID and birth date), images/*.dcm (CR/DX, MONOCHROME1/2, 10-16 bits, 1024-3000 px, native, \
deflated, RLE or JPEG-LS) and labels.csv (oxygen level 0-4 at 24 h and 72 h), and DIR/truth.json: \
the label model and the Bayes-optimal AUC of every output per site and pooled. Site 1 uses the \
canonical schema, site 2 the example site's convention (plugins/example-site), the others \
alternate canonical names in other units and the example convention. Sites differ in \
prevalence, age, label noise, missingness, size and scanner; --site-mixes gives them different \
case mixes (a non-IID cohort for federation studies):\n  \
oxbox synth --site-sizes 400,250,150,80,60 --site-mixes referral,general,community,vitals-only,community \
--no-images --seed 7 --out cohorts/non-iid\nSame seed, same files."
)]
pub struct Args {
    /// Number of sites.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u32).range(1..=64))]
    pub sites: u32,
    /// Mean cases per site (sites range from 0.7× to 1.3×).
    #[arg(long, default_value_t = 400, value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub cases_per_site: u32,
    /// Exact cases of each site, comma-separated (e.g. 600,400,250,150,100):
    /// unequal sites; replaces --sites and --cases-per-site. The label model
    /// and each site's other parameters stay those of its index.
    #[arg(long, value_name = "N,N,...", value_delimiter = ',', num_args = 1..,
          value_parser = clap::value_parser!(u32).range(1..=100_000))]
    pub site_sizes: Option<Vec<u32>>,
    /// Each site's case mix, comma-separated, one per site: general (the
    /// site's own profile, the default), community (milder, younger
    /// patients, basic labs only), referral (sicker, older patients, full
    /// lab panel), vitals-only (no lab results in the export). Changes who
    /// the site's patients are, never the label model.
    #[arg(long, value_name = "MIX,MIX,...", value_delimiter = ',', num_args = 1..)]
    pub site_mixes: Option<Vec<oxbox::synth::cohort::CaseMix>>,
    /// Write no radiographs (image_file left empty): a cohort for EMR-only
    /// models (`--emr-only`), written in seconds; labels and EMR values are
    /// the same as with images.
    #[arg(long)]
    pub no_images: bool,
    /// Radiographs at most this many pixels on their longer side (default:
    /// each scanner's own, 1024-3000): a quick cohort for tests and demos,
    /// otherwise the same as without it.
    #[arg(long, value_name = "PIXELS",
          value_parser = clap::value_parser!(u32).range(
              i64::from(oxbox::synth::MIN_IMAGE_SIDE)..=i64::from(oxbox::synth::MAX_IMAGE_SIDE)))]
    pub max_image_side: Option<u32>,
    /// Seed.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Output folder (created; must be absent or empty).
    #[arg(long, value_name = "DIR")]
    pub out: PathBuf,
}

/// Runs `oxbox synth`.
pub fn run(args: Args) -> anyhow::Result<()> {
    let options = SynthOptions {
        sites: args.sites as usize,
        cases_per_site: args.cases_per_site as usize,
        site_sizes: args
            .site_sizes
            .map(|sizes| sizes.into_iter().map(|s| s as usize).collect()),
        site_mixes: args.site_mixes,
        no_images: args.no_images,
        max_image_side: args.max_image_side,
        seed: args.seed,
        out: args.out,
    };
    let total: usize = options.profiles().iter().map(|p| p.cases).sum();
    let bar = ProgressBar::new(total as u64);
    bar.set_style(
        ProgressStyle::with_template("{bar:40} {pos}/{len} cases  {elapsed} elapsed, ETA {eta}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let started = Instant::now();
    let truth = generate(&options, &|| bar.inc(1))?;
    bar.finish_and_clear();
    let pooled = truth.pooled_bayes_auc;
    println!(
        "{}",
        serde_json::to_string_pretty(&serde_json::json!({
            "out": options.out.display().to_string(),
            "sites": truth.sites.iter().map(|s| serde_json::json!({
                "id": s.id, "cases": s.cases, "convention": s.convention,
                "prevalence_o2_any_24h": s.prevalence_o2_any_24h,
            })).collect::<Vec<_>>(),
            "cases": total,
            "pooled_bayes_auc": pooled,
            "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
        }))?
    );
    Ok(())
}
