//! Crash safety: the real `fedveil-server` binary is killed with SIGKILL at
//! random moments during rounds, many times, and restarted. Each restart
//! must resume exactly the state last committed to its database (model,
//! optimizer moments, privacy ledger), and no round may be charged to the
//! privacy ledger twice.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::Duration;

use fedveil_client::driver::RetryPolicy;
use fedveil_client::{ClientOptions, LocalTrainer, Trainer};
use fedveil_ml::data::{self, DatasetName, Download, Partition, Shard};
use fedveil_net::pki::{self, NodeIdentity};
use fedveil_net::quic::ServerIdentity;
use fedveil_proto::dp::rdp;
use fedveil_server::Registry;
use fedveil_server::store::{STATE_DB_FILE, Store};
use rand::{RngExt, SeedableRng};
use sha2::Digest;

const CLIENTS: usize = 3;
const ROUNDS: u64 = 12;
const NOISE: f64 = 1.0;
const DELTA: f64 = 1e-5;
const KILLS: usize = 6;

fn fingerprint(values: &[f32]) -> String {
    let mut h = sha2::Sha256::new();
    for v in values {
        h.update(v.to_le_bytes());
    }
    hex::encode(h.finalize())
}

fn free_port() -> u16 {
    std::net::UdpSocket::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn start_server(dir: &Path, port: u16) -> (Child, std::sync::mpsc::Receiver<String>) {
    // Half the settings come from a recipe file, as `--config` takes them:
    // a flag overrides the file (`--rounds`), and a simulation-only key
    // (`clients`) is ignored by a deployment.
    std::fs::create_dir_all(dir).unwrap();
    let recipe = dir.join("recipe.toml");
    std::fs::write(
        &recipe,
        "dataset = \"synthetic\"\nrounds = 1\nlocal_epochs = 1\nbatch_size = 20\nlr = 0.1\n\
         server_optimizer = \"fedadam\"\nsecagg = false\nclients = 99\n",
    )
    .unwrap();
    let mut child = Command::new(env!("CARGO_BIN_EXE_fedveil-server"))
        .args(["run", "--dir"])
        .arg(dir)
        .arg("--config")
        .arg(&recipe)
        .args([
            "--listen",
            &format!("127.0.0.1:{port}"),
            "--min-clients",
            &CLIENTS.to_string(),
            "--rounds",
            &ROUNDS.to_string(),
            "--round-timeout",
            "30",
            "--dp",
            "central",
            "--noise-multiplier",
            &NOISE.to_string(),
            "--dp-budget",
            "1000",
            "--log",
            "warn",
        ])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start fedveil-server");
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            let _ = tx.send(line);
        }
    });
    (child, rx)
}

/// Creates the server's identity in `dir` (as `fedveil-server init` does)
/// and enrols the nodes in its registry in process: token, CSR, signed
/// certificate, through the same registry calls the enrolment service uses.
fn enrol_nodes(dir: &Path) -> Vec<NodeIdentity> {
    let identity = ServerIdentity::load_or_create(dir, &["localhost".into()]).unwrap();
    let ca = identity.ca.expect("a fresh identity holds its CA key");
    let registry = Registry::open(&dir.join(STATE_DB_FILE)).unwrap();
    let now = pki::unix_now();
    (0..CLIENTS)
        .map(|i| {
            let name = format!("node-{i}");
            let token = registry
                .issue_token(&name, pki::DEFAULT_TOKEN_TTL, now)
                .unwrap()
                .token;
            let (key, csr) = pki::new_key_and_csr(&name).unwrap();
            let issued = registry
                .enrol(&token, None, now, |n| {
                    ca.issue_client(&csr, n, now - 60, now + 86_400)
                })
                .unwrap();
            NodeIdentity::new(key, issued.der, ca.cert_der().to_vec()).unwrap()
        })
        .collect()
}

fn start_clients(
    dir: &Path,
    port: u16,
    nodes: &[NodeIdentity],
) -> Vec<tokio::task::JoinHandle<()>> {
    let split = data::load(DatasetName::Synthetic, dir, Download::Never, 0).unwrap();
    let parts = Partition::Iid
        .split(&split.train.labels, split.train.num_classes, CLIENTS, 0)
        .unwrap();
    (0..CLIENTS)
        .map(|i| {
            let shard = Shard {
                data: Arc::clone(&split.train),
                indices: parts[i].clone(),
            };
            let trainer: Arc<dyn LocalTrainer> = Arc::new(
                Trainer::new("cnn", shard, burn::prelude::Device::flex(), i as u64).unwrap(),
            );
            let identity = nodes[i].clone();
            tokio::spawn(async move {
                let endpoint = quinn::Endpoint::client("127.0.0.1:0".parse().unwrap()).unwrap();
                let addr = format!("127.0.0.1:{port}").parse().unwrap();
                let mut opts = ClientOptions::enrolled(addr, "localhost", &identity).unwrap();
                opts.retry = RetryPolicy {
                    attempts: 200,
                    timeout: Duration::from_millis(500),
                    initial_backoff: Duration::from_millis(50),
                    max_backoff: Duration::from_millis(200),
                };
                let _ = fedveil_client::run(&endpoint, &opts, trainer).await;
            })
        })
        .collect()
}

/// (next round, model hash, moments hash, newest ledger epsilon).
type Committed = (u64, String, String, f64);

/// What the database holds now, and the charged rounds in order.
fn committed(db: &Path) -> Option<(Committed, Vec<u64>)> {
    let store = Store::open_existing(db, "default").ok()?;
    let saved = store.load().unwrap();
    let charged: Vec<u64> = store
        .charged_rounds()
        .unwrap()
        .into_iter()
        .map(|(r, _)| r)
        .collect();
    let c = saved.checkpoint?;
    // The strategy's buffers in name order: FedAdam's m, then v.
    let moments: Vec<f32> = c.strategy.buffers.values().flatten().copied().collect();
    let eps = saved
        .ledger
        .as_ref()
        .or(c.ledger.as_ref())
        .map_or(0.0, |l| l.epsilon());
    Some((
        (
            c.next_round.max(charged.last().map_or(0, |r| r + 1)),
            fingerprint(&c.global_model),
            fingerprint(&moments),
            eps,
        ),
        charged,
    ))
}

fn resumed_line(rx: &std::sync::mpsc::Receiver<String>) -> String {
    loop {
        let line = rx
            .recv_timeout(Duration::from_secs(120))
            .expect("the server says what it resumed");
        if line.starts_with("resumed run") {
            return line;
        }
    }
}

fn temp_dir() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("fedveil-crash-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_at_random_moments_resumes_the_committed_state_and_never_double_charges() {
    let dir = temp_dir();
    let db = dir.join(STATE_DB_FILE);
    let port = free_port();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(2024);
    let mut resumes = 0;
    let mut charged_so_far: Vec<u64> = Vec::new();
    let nodes = enrol_nodes(&dir);
    for kill in 0..=KILLS {
        let before = committed(&db);
        let (mut server, lines) = start_server(&dir, port);
        if let Some(((next_round, model, moments, eps), _)) = &before {
            let line = resumed_line(&lines);
            assert!(line.contains(&format!("at round {next_round} ")), "{line}");
            assert!(line.contains(&format!("model sha256 {model};")), "{line}");
            assert!(
                line.contains(&format!("moments sha256 {moments};")),
                "{line}"
            );
            assert!(line.ends_with(&format!("epsilon {eps:.6}")), "{line}");
            resumes += 1;
        }
        let clients = start_clients(&dir, port, &nodes);
        if kill < KILLS {
            // Let this incarnation commit a round, then kill it somewhere in
            // the next one: waiting for clients, training, unmasking, or
            // committing.
            let start = before.as_ref().map(|(s, _)| s.clone());
            loop {
                let now = committed(&db).map(|(s, _)| s);
                if now.is_some() && now != start {
                    break;
                }
                assert!(
                    server.try_wait().unwrap().is_none(),
                    "the server exited early"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let wait = rng.random_range(0..2500);
            tokio::time::sleep(Duration::from_millis(wait)).await;
            if server.try_wait().unwrap().is_some() {
                break; // finished before this kill
            }
            server.kill().unwrap(); // SIGKILL
            server.wait().unwrap();
        } else {
            let status = tokio::task::spawn_blocking(move || server.wait().unwrap())
                .await
                .unwrap();
            assert!(status.success(), "the last run ends cleanly: {status}");
        }
        for c in clients {
            c.abort();
        }
        if let Some((_, charged)) = committed(&db) {
            // Charges only grow, one row per round number, in order.
            assert!(
                charged.starts_with(&charged_so_far),
                "{charged_so_far:?} -> {charged:?}"
            );
            assert!(charged.windows(2).all(|w| w[0] < w[1]), "{charged:?}");
            charged_so_far = charged;
        }
    }
    // The run completed every round it was asked for.
    let store = Store::open_existing(&db, "default").unwrap();
    let saved = store.load().unwrap();
    let c = saved.checkpoint.unwrap();
    assert_eq!(c.rounds_completed, ROUNDS);
    assert_eq!(resumes, KILLS, "every restart resumed committed state");
    // Epsilon is exactly that of the rounds charged, each once: no round was
    // lost from the ledger, none counted twice.
    let ledger = saved.ledger.unwrap();
    let charged = store.charged_rounds().unwrap();
    assert_eq!(ledger.rounds_charged(), charged.len());
    assert!(charged.len() as u64 >= ROUNDS);
    let want = rdp::gaussian_epsilon(1.0, NOISE, charged.len() as u64, DELTA).unwrap();
    assert!(
        (ledger.epsilon() - want).abs() < 1e-9 * want,
        "{} vs {want}",
        ledger.epsilon()
    );
    // Started again, the finished run says so and exits without a round.
    let (mut again, lines) = start_server(&dir, port);
    let exit = tokio::task::spawn_blocking(move || again.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success());
    // Ends when the reader thread sees end of output.
    let said: Vec<String> = lines.iter().collect();
    assert!(
        said.iter()
            .any(|l| l.contains(&format!("already completed its {ROUNDS} rounds"))),
        "{said:?}"
    );
    eprintln!(
        "{resumes} resumes; {} rounds charged for {ROUNDS} completed; epsilon {:.4}",
        charged.len(),
        ledger.epsilon()
    );
    let _ = std::fs::remove_dir_all(&dir);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_abandons_the_round_exits_cleanly_and_the_run_resumes() {
    let dir = std::env::temp_dir().join(format!("fedveil-sigterm-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let db = dir.join(STATE_DB_FILE);
    let port = free_port();
    let nodes = enrol_nodes(&dir);
    let (mut server, _lines) = start_server(&dir, port);
    let clients = start_clients(&dir, port, &nodes);
    while committed(&db).is_none() {
        assert!(
            server.try_wait().unwrap().is_none(),
            "the server exited early"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let status = Command::new("kill")
        .args(["-TERM", &server.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
    let exit = tokio::task::spawn_blocking(move || server.wait().unwrap())
        .await
        .unwrap();
    assert!(exit.success(), "SIGTERM is a clean exit: {exit}");
    for c in clients {
        c.abort();
    }
    let ((next_round, model, _, _), _) = committed(&db).unwrap();
    let (mut again, lines) = start_server(&dir, port);
    let line = resumed_line(&lines);
    assert!(line.contains(&format!("at round {next_round} ")), "{line}");
    assert!(line.contains(&format!("model sha256 {model};")), "{line}");
    again.kill().unwrap();
    again.wait().unwrap();
    // Export the committed model; loading the file back gives the same bits.
    let out = dir.join("global.safetensors");
    let export = Command::new(env!("CARGO_BIN_EXE_fedveil-server"))
        .args(["export", "--format", "safetensors", "--dir"])
        .arg(&dir)
        .arg("--out")
        .arg(&out)
        .output()
        .unwrap();
    assert!(
        export.status.success(),
        "{}",
        String::from_utf8_lossy(&export.stderr)
    );
    let committed_model = Store::open_existing(&db, "default")
        .unwrap()
        .global_model()
        .unwrap();
    let split = data::load(DatasetName::Synthetic, &dir, Download::Never, 0).unwrap();
    let shape = fedveil_ml::model::DataShape::of(&split.test);
    let mut model =
        fedveil_ml::model::build("cnn", &shape, &burn::prelude::Device::flex()).unwrap();
    model.load_safetensors(&out).unwrap();
    let loaded = model.params();
    assert_eq!(loaded.len(), committed_model.len());
    assert!(
        loaded
            .iter()
            .zip(&committed_model)
            .all(|(a, b)| a.to_bits() == b.to_bits())
    );
    let _ = std::fs::remove_dir_all(&dir);
}
