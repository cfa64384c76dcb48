//! An embedded deployment: a server and three clinic nodes in one program,
//! each clinic training on its own folder of images.
//!
//! Everything a real deployment does happens here: the server makes its
//! own CA, each node enrols with a one-time token (its key never leaves its
//! directory), training runs over mutual TLS 1.3 through SecAgg+, and the
//! server's state is durable: the server goes down after round 2, comes
//! back, resumes at round 3 with the same model and strategy state, and the
//! nodes reconnect with the identities they saved.
//!
//! Differential privacy is one setting away (`target_epsilon`, as in the
//! `own_model` example), and the privacy ledger resumes the same way. It is
//! off here: with three nodes, noise that protects each of them swamps what
//! they learn; DP pays off from hundreds of nodes.
//!
//! The folders (one subfolder per class, PNG files) are written first from
//! the MNIST files in the data directory; with folders of your own, point
//! `load_image_folder` at them.
//!
//! ```sh
//! FEDVEIL_DATA=../shared/data cargo run --release -p fedveil-examples --example embedded
//! ```

use std::path::Path;
use std::sync::Arc;

use fedveil::burn::prelude::Device;
use fedveil::client::{Node, Trainer};
use fedveil::data::{Dataset, DatasetName, Download, ImageFolderSpec, Shard, load_image_folder};
use fedveil::metrics::RoundMetrics;
use fedveil::model::builtin;
use fedveil::server::deploy::sha256_hex;
use fedveil::server::{Observer, RunReport, RunStatus, Server};
use fedveil::settings::Settings;
use tokio::sync::watch;

const CLINICS: [&str; 3] = ["clinic-a", "clinic-b", "clinic-c"];
/// Images per class in each clinic's folder, and in the server's.
const IMAGES_PER_CLASS: usize = 60;
/// The server goes down after this round the first time.
const CRASH_AFTER: u64 = 2;

/// One start of the deployment: the server, with identity and state in
/// `dir`, and the three clinics on their folders under `images`. With
/// `crash_after`, the server stops after that round.
async fn start(
    dir: &Path,
    images: &Path,
    crash_after: Option<u64>,
) -> anyhow::Result<(RunStatus, RunReport)> {
    let folder = ImageFolderSpec {
        side: 28,
        channels: 1,
        classes: None,
    };
    let settings = Settings {
        rounds: 6,
        lr: 0.1,
        batch_size: 16,
        ..Settings::default() // SecAgg+ is on by default
    };
    let (stop, stopped) = watch::channel(false);
    let server = Server::builder(settings)
        .model(
            builtin("cnn")?,
            Arc::new(load_image_folder(&images.join("server"), &folder)?),
        )
        .identity_dir(dir.join("server"))
        .state(dir.join("server/state.db"), "clinics")
        .listen("127.0.0.1:0".parse()?)
        .observer(Box::new(Progress { crash_after, stop }))
        .build()?;
    // Tokens on the first start; afterwards the nodes have identities.
    let first_start = *server.status() == RunStatus::Started;
    let invitations: Vec<_> = CLINICS
        .iter()
        .map(|name| first_start.then(|| server.invite(name)).transpose())
        .collect::<Result<_, _>>()?;
    if let RunStatus::Resumed {
        next_round,
        model_sha256,
        ..
    } = server.status()
    {
        println!("the server restarted at round {next_round} with model sha256 {model_sha256}");
    }
    let (address, status) = (server.address(), server.status().clone());
    let running = tokio::spawn(server.run(async move {
        let _ = { stopped }.wait_for(|stop| *stop).await;
    }));
    let mut nodes = tokio::task::JoinSet::new();
    for (i, invitation) in invitations.into_iter().enumerate() {
        let home = dir.join(CLINICS[i]);
        let data = Arc::new(load_image_folder(&images.join(CLINICS[i]), &folder)?);
        let address = address.clone();
        nodes.spawn(async move {
            let mut node = match invitation {
                Some(invitation) => Node::enrol_into(&home, &invitation).await?,
                None => Node::open_at(&home, Some(&address)).await?,
            };
            let trainer = Trainer::new("cnn", Shard::whole(data), Device::flex(), i as u64)?;
            let trained = node.run(Arc::new(trainer)).await;
            node.wait_idle().await;
            anyhow::Ok(trained)
        });
    }
    let report = running.await?;
    while let Some(node) = nodes.join_next().await {
        // A node whose server went down mid-run says so: that is the crash
        // this example stages, not a failure.
        if let Err(err) = node?? {
            anyhow::ensure!(report.interrupted, "a node failed: {err}");
        }
    }
    Ok((status, report))
}

/// Prints each round; stops the server after `crash_after`.
struct Progress {
    crash_after: Option<u64>,
    stop: watch::Sender<bool>,
}

impl Observer for Progress {
    fn on_round(&mut self, m: &RoundMetrics, _global_model: &[f32]) {
        println!(
            "round {}: {}  loss {:.4}  secure {}",
            m.round,
            m.score_text(),
            m.loss,
            m.secure
        );
        if self.crash_after == Some(m.round) {
            println!("the server goes down");
            let _ = self.stop.send(true);
        }
    }
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let work = std::env::temp_dir().join(format!("fedveil-embedded-{}", std::process::id()));
    let images = work.join("images");
    write_folders(&images)?;

    let (_, first) = start(&work, &images, Some(CRASH_AFTER)).await?;
    anyhow::ensure!(
        first.interrupted && first.metrics.last().map(|m| m.round) == Some(CRASH_AFTER),
        "the first start should stop after round {CRASH_AFTER}"
    );
    let saved = sha256_hex(&first.final_model);
    println!("the server went down with model sha256 {saved}");
    // Same directories, no new tokens: the run resumes where it stopped.
    let (status, second) = start(&work, &images, None).await?;
    let RunStatus::Resumed {
        next_round,
        model_sha256,
        ..
    } = status
    else {
        anyhow::bail!("the second start should resume, not {status:?}");
    };
    anyhow::ensure!(
        next_round == CRASH_AFTER + 1 && model_sha256 == saved,
        "the run should resume at round {} with the saved model",
        CRASH_AFTER + 1
    );
    let last = second
        .metrics
        .last()
        .ok_or_else(|| anyhow::anyhow!("no round completed after the restart"))?;
    println!(
        "embedded server and 3 clinics on image folders, SecAgg+, restarted after round {CRASH_AFTER}: test accuracy {:.4} after round {}",
        last.accuracy.unwrap_or(f32::NAN),
        last.round,
    );
    std::fs::remove_dir_all(&work)?;
    Ok(())
}

/// Writes each clinic's folder and the server's held-out one, a subfolder
/// per digit, from MNIST.
fn write_folders(root: &Path) -> anyhow::Result<()> {
    let dir = fedveil::data::resolve_data_dir(None);
    let mnist = fedveil::data::load(DatasetName::Mnist, &dir, Download::IfMissing, 1)?;
    let write = |folder: &str, data: &Dataset, next: &mut usize| -> anyhow::Result<()> {
        let mut counts = vec![0; data.num_classes];
        while counts.iter().any(|&c| c < IMAGES_PER_CLASS) {
            let (i, label) = (*next, data.labels[*next] as usize);
            *next += 1;
            if counts[label] == IMAGES_PER_CLASS {
                continue;
            }
            counts[label] += 1;
            let pixels = data.example(i).iter().map(|&p| (p * 255.0).round() as u8);
            let class = root.join(folder).join(format!("digit-{label}"));
            std::fs::create_dir_all(&class)?;
            image::GrayImage::from_raw(28, 28, pixels.collect())
                .ok_or_else(|| anyhow::anyhow!("an MNIST image is 28x28"))?
                .save(class.join(format!("{i:05}.png")))?;
        }
        Ok(())
    };
    let mut next = 0;
    for clinic in CLINICS {
        write(clinic, &mnist.train, &mut next)?;
    }
    write("server", &mnist.test, &mut 0)
}
