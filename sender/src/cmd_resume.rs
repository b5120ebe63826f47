//! `pilotlight-sender resume`: after failback's cutover, one incremental generation
//! that brings the replica to the site's disk; protection goes on from it.

use crate::{resolve, s3_store, send_once, SendArgs, SharedArgs};
use anyhow::{Context, Result};
use clap::Args;
use pilotlight_cloud::AwsSettings;
use pilotlight_failback::Target as FailbackTarget;
use pilotlight_protocol::{Consistency, DiskId};
use pilotlight_sender::Target;
use std::path::{Path, PathBuf};

/// Settings of `resume` (plus those of `send`: --disk-id, and --disk or --nbd, the site's
/// disk after the cutover; its --source is decided here).
#[derive(Args, Debug)]
pub struct ResumeArgs {
    /// The generation of the recovery point the instance was launched from
    /// (`pilotlight-dr points --json` and the run's report name it). Give that one: a
    /// higher one would leave out what the generations between changed.
    #[arg(long)]
    point_generation: u64,
    #[command(flatten)]
    send: SendArgs,
}

pub async fn run(a: ResumeArgs, shared: SharedArgs) -> Result<()> {
    let disk_file = a.send.disk.clone();
    let nbd = a.send.nbd.clone();
    let disk_id = a
        .send
        .disk_id
        .clone()
        .context("--disk-id site/vm/disk is required")?;
    let disk = DiskId::parse(&disk_id).with_context(|| format!("--disk-id {disk_id:?}"))?;
    let change_id = a.send.change_id.clone();
    let r = resolve(shared.into_send(a.send), false)?;
    let store = s3_store(&r);
    let source = resume_source(
        &disk,
        disk_file,
        nbd,
        a.point_generation,
        &r.upload.state_dir,
        &r.upload.prefix,
        store.get().await,
        &AwsSettings::new(r.region.clone(), r.endpoint_url.clone()).max_attempts(r.max_attempts),
    )
    .await?;
    let target = Target {
        disk,
        source,
        change_id,
        snapshot_time: None,
        consistency: Consistency::Crash,
    };
    send_once(&r, &target, &store).await
}

/// The source of `resume`: the site's disk (a file or block device, or an NBD export),
/// read where it may differ from the replica: what the failback found changed since the
/// point (the instance's blocks and the site's own), and every range of the generations
/// sent after the point's generation (the replica holds them; the site's disk went back).
#[allow(clippy::too_many_arguments)]
pub async fn resume_source(
    disk: &DiskId,
    file: Option<PathBuf>,
    nbd: Option<String>,
    point_generation: u64,
    state_dir: &Path,
    prefix: &pilotlight_protocol::Prefix,
    store: &pilotlight_cloud::s3::SdkS3,
    aws: &AwsSettings,
) -> Result<pilotlight_sender::source::SourceSpec> {
    use pilotlight_sender::source::SourceSpec;
    let path = pilotlight_failback::state::path(state_dir, disk);
    let st = pilotlight_failback::state::load(&path)?.with_context(|| {
        format!(
            "{disk}: no failback state in {}: resume follows a failback (give the --state-dir it used)",
            path.display()
        )
    })?;
    let size = match (&file, &nbd) {
        // Read only: resume never writes the site's disk.
        (Some(f), None) => {
            use std::io::Seek;
            let mut disk = std::fs::File::open(f)
                .with_context(|| format!("cannot open --disk {}", f.display()))?;
            disk.seek(std::io::SeekFrom::End(0))?
        }
        (None, Some(u)) => FailbackTarget::open(u).await?.size(),
        _ => anyhow::bail!("give the site's disk as --disk FILE or --nbd URI (one of them)"),
    };
    let ebs = aws.load().await.ebs();
    let mut extents = pilotlight_failback::resume::changed_since_point(&ebs, &st, size).await?;
    let generations = pilotlight_store::manifests::list(store, prefix, disk).await?;
    // A generation that is not there is a mistake; one too high would leave out what
    // changed after the real point, so say which it takes.
    if !generations.contains(&point_generation) {
        anyhow::bail!(
            "--point-generation {point_generation}: {disk} has no such generation in the bucket (it has {}); `pilotlight-dr points --json` names each point's generation",
            match (generations.first(), generations.last()) {
                (Some(a), Some(b)) => format!("{a} to {b}"),
                _ => "none".into(),
            }
        );
    }
    let later: Vec<u64> = generations
        .into_iter()
        .filter(|g| *g > point_generation)
        .collect();
    for g in &later {
        let m = pilotlight_store::manifests::read(store, prefix, disk, *g).await?;
        extents.extend(
            m.objects
                .iter()
                .flat_map(|o| o.parts())
                .map(|e| (e.offset, e.length)),
        );
        extents.extend(m.zero_ranges.iter().map(|e| (e.offset, e.length)));
    }
    let extents = pilotlight_failback::resume::merge(extents, size);
    let bytes: u64 = extents.iter().map(|(_, l)| l).sum();
    tracing::info!(
        "{disk}: resuming from the failback ({} ranges, {}; generations after {point_generation}: {later:?})",
        extents.len(),
        bytesize::ByteSize(bytes)
    );
    Ok(match (file, nbd) {
        (Some(disk_file), _) => {
            let list = path.with_extension("resume.txt");
            let text: String = extents.iter().map(|(o, l)| format!("{o} {l}\n")).collect();
            pilotlight_durable::write_atomic(&list, text.as_bytes())?;
            SourceSpec::ExtentList {
                list,
                disk: disk_file,
            }
        }
        (None, Some(uri)) => SourceSpec::NbdChanged {
            uri,
            changed: extents
                .into_iter()
                .map(|(o, l)| pilotlight_protocol::Extent::new(o, l))
                .collect(),
            full: false,
        },
        (None, None) => anyhow::bail!("give the site's disk as --disk FILE or --nbd URI"),
    })
}
