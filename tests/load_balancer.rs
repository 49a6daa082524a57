//! Replicas behind a real load balancer, on loopback: three `fluxrt serve` processes on the bundled tiny model
//! behind HAProxy (Debian's package) configured by `deploy/haproxy.cfg`, as docs/deploy.md recommends. Under 32
//! clients of seeded requests, one replica is drained (SIGTERM) and another killed (SIGKILL): every request
//! gets its image or an answer the client may retry (429/503 with Retry-After), none is lost or hangs, and a seed
//! gives the same pixels whichever replica drew it. The figures (requests, retries, p50/p99 with one and three
//! replicas) are printed for the closing note: `cargo test --test load_balancer -- --nocapture`.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::io::{BufRead, BufReader, Write};
use std::net::{SocketAddr, TcpListener};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use common::http::*;
use common::{model, root};
use serde_json::json;

const CLIENTS: usize = 32;
/// Distinct seeds: each is drawn many times, by whichever replica the balancer picks.
const SEEDS: u64 = 12;
/// How long a client waits before retrying a 429/503, at most (the server's Retry-After may say more).
const MAX_BACKOFF: Duration = Duration::from_millis(500);

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn haproxy() -> PathBuf {
    let found = [
        "/usr/sbin/haproxy",
        "/usr/bin/haproxy",
        "/usr/local/sbin/haproxy",
    ]
    .into_iter()
    .map(PathBuf::from)
    .find(|p| p.is_file());
    found.expect(
        "HAProxy is not installed: `apt-get install haproxy` (scripts/test.sh installs it when it can)",
    )
}

/// One `fluxrt serve` process, ready.
struct Replica {
    name: String,
    port: u16,
    child: Child,
}

impl Replica {
    fn start(name: &str) -> Replica {
        let port = free_port();
        let mut child = Command::new(env!("CARGO_BIN_EXE_fluxrt"))
            .args([
                "serve",
                "--host",
                "127.0.0.1",
                "--threads",
                "1",
                "--max-queue",
                "8",
            ])
            .args(["--drain-delay", "2", "--shutdown-timeout", "20", "--port"])
            .arg(port.to_string())
            .arg("--model")
            .arg(model("tiny-flux-schnell"))
            .stderr(Stdio::piped())
            .spawn()
            .expect("fluxrt starts");
        // Keep reading its log so the pipe never fills.
        let log = BufReader::new(child.stderr.take().unwrap());
        std::thread::spawn(move || log.lines().map_while(|l| l.ok()).for_each(drop));
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for(
            &format!("replica {name} ready"),
            Duration::from_secs(120),
            || std::net::TcpStream::connect(addr).is_ok() && get(addr, "/ready").status == 200,
        );
        Replica {
            name: name.into(),
            port,
            child,
        }
    }

    fn signal(&self, sig: &str) {
        signal(self.child.id(), sig);
    }
}

/// `kill SIG PID`.
fn signal(pid: u32, sig: &str) {
    let ok = Command::new("kill")
        .args([sig, &pid.to_string()])
        .status()
        .unwrap();
    assert!(ok.success());
}

impl Drop for Replica {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// HAProxy in the foreground with deploy/haproxy.cfg, its frontend on `port` and its servers `replicas`; each
/// response says which replica made it (X-Served-By, added for the test).
struct Balancer {
    addr: SocketAddr,
    child: Child,
    dir: tempfile::TempDir,
}

impl Balancer {
    fn start(replicas: &[&Replica]) -> Balancer {
        let template = std::fs::read_to_string(root().join("deploy/haproxy.cfg")).unwrap();
        let port = free_port();
        let servers: String = replicas
            .iter()
            .map(|r| {
                format!(
                    "    server {} 127.0.0.1:{}{}\n",
                    r.name,
                    r.port,
                    server_options(&template)
                )
            })
            .collect();
        let mut cfg = String::new();
        for line in template.lines() {
            let t = line.trim_start();
            if t.starts_with("bind ") {
                cfg.push_str(&format!("    bind 127.0.0.1:{port}\n"));
            } else if t.starts_with("server ") {
                if !cfg.contains("X-Served-By") {
                    cfg.push_str("    http-response set-header X-Served-By %[srv_name]\n");
                    cfg.push_str(&servers);
                }
            } else {
                cfg.push_str(line);
                cfg.push('\n');
            }
        }
        assert!(
            cfg.contains("X-Served-By"),
            "deploy/haproxy.cfg has no server lines:\n{template}"
        );
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("haproxy.cfg");
        std::fs::File::create(&path)
            .unwrap()
            .write_all(cfg.as_bytes())
            .unwrap();
        let check = Command::new(haproxy())
            .args(["-c", "-q", "-f"])
            .arg(&path)
            .output()
            .unwrap();
        assert!(
            check.status.success(),
            "haproxy -c rejects the config:\n{}\n{cfg}",
            String::from_utf8_lossy(&check.stderr)
        );
        let log = std::fs::File::create(dir.path().join("haproxy.log")).unwrap();
        let child = Command::new(haproxy())
            .args(["-db", "-f"])
            .arg(&path)
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .expect("haproxy starts");
        let addr = SocketAddr::from(([127, 0, 0, 1], port));
        wait_for("the balancer to route", Duration::from_secs(20), || {
            std::net::TcpStream::connect(addr).is_ok() && get(addr, "/ready").status == 200
        });
        Balancer { addr, child, dir }
    }
}

impl Balancer {
    /// HAProxy's log lines other than plain 200s (a line per request: replica, status, termination state,
    /// retries; and the servers going down), for failure messages.
    fn log_tail(&self) -> String {
        let log = std::fs::read_to_string(self.dir.path().join("haproxy.log")).unwrap_or_default();
        let odd: Vec<&str> = log.lines().filter(|l| !l.contains(" 200 ")).collect();
        odd[odd.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Balancer {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The options of the template's first `server` line (health checks and the like), to keep on ours.
fn server_options(template: &str) -> String {
    template
        .lines()
        .map(str::trim)
        .find(|l| l.starts_with("server "))
        .map(|l| {
            l.split_whitespace()
                .skip(3)
                .map(|w| format!(" {w}"))
                .collect()
        })
        .unwrap_or_default()
}

#[derive(Default)]
struct Tally {
    answered: usize,
    retried: usize,
    /// Retries that followed a 502 or a connection closed without an answer (a replica killed mid-request).
    gateway_errors: usize,
    lost: Vec<String>,
    latencies: Vec<Duration>,
    /// seed -> every distinct PNG drawn for it
    images: BTreeMap<u64, BTreeSet<Vec<u8>>>,
    served_by: BTreeMap<String, usize>,
}

impl Tally {
    fn percentile(&self, p: f64) -> Duration {
        let mut l = self.latencies.clone();
        l.sort();
        l[((l.len() - 1) as f64 * p).round() as usize]
    }
}

/// `total` seeded requests from `CLIENTS` clients through the balancer; `on_progress(done)` runs after each answer.
fn load(
    lb: SocketAddr,
    total: usize,
    on_progress: impl Fn(usize) + Send + Sync + 'static,
) -> Tally {
    let next = Arc::new(AtomicUsize::new(0));
    let done = Arc::new(AtomicUsize::new(0));
    let tally = Arc::new(Mutex::new(Tally::default()));
    let on_progress = Arc::new(on_progress);
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (next, done, tally, on_progress) = (next.clone(), done.clone(), tally.clone(), on_progress.clone());
            std::thread::spawn(move || loop {
                let k = next.fetch_add(1, Ordering::SeqCst);
                if k >= total {
                    return;
                }
                let seed = k as u64 % SEEDS;
                let body = json!({"prompt": "a lighthouse", "width": 64, "height": 64, "steps": 2, "seed": seed});
                let t0 = Instant::now();
                let mut retries = 0;
                // The retry rule of the official OpenAI clients (openai-python's default): 429 and 5xx after
                // Retry-After (or a short back-off), and a connection that closed without an answer. A seeded
                // request is deterministic, so a retry is safe.
                let mut gateway_errors = 0;
                let outcome = loop {
                    if retries >= 40 {
                        break Err("still no image after 40 retries".to_string());
                    }
                    let wait = match try_post(lb, &body) {
                        Ok(r) if r.status == 200 => break Ok(r),
                        Ok(r) if r.status == 429 || r.status >= 500 => {
                            if r.status == 502 {
                                gateway_errors += 1;
                            }
                            let after = r.header("retry-after").and_then(|v| v.parse::<u64>().ok());
                            after.map_or(Duration::from_millis(100), Duration::from_secs)
                        }
                        Ok(r) => break Err(format!("status {}: {}", r.status, String::from_utf8_lossy(&r.body))),
                        // A read that timed out is a hang: lost. Any other I/O error (closed without a byte, reset)
                        // is a dropped connection, which clients retry.
                        Err(e) if matches!(e.kind(), std::io::ErrorKind::TimedOut | std::io::ErrorKind::WouldBlock) => {
                            break Err(format!("no answer within the client's timeout: {e}"))
                        }
                        Err(_) => {
                            gateway_errors += 1;
                            Duration::from_millis(100)
                        }
                    };
                    retries += 1;
                    std::thread::sleep(wait.min(MAX_BACKOFF));
                };
                let mut t = tally.lock().unwrap();
                t.retried += retries;
                t.gateway_errors += gateway_errors;
                match outcome {
                    Ok(r) => {
                        t.answered += 1;
                        t.latencies.push(t0.elapsed());
                        let by = r.header("x-served-by").unwrap_or("?").to_string();
                        *t.served_by.entry(by).or_default() += 1;
                        let png = b64_field(&r.json()["images"][0]["png_base64"]);
                        t.images.entry(seed).or_default().insert(png);
                    }
                    Err(e) => t.lost.push(format!("seed {seed}: {e}")),
                }
                drop(t);
                on_progress(done.fetch_add(1, Ordering::SeqCst) + 1);
            })
        })
        .collect();
    for c in clients {
        c.join().expect("a client thread");
    }
    Arc::try_unwrap(tally).ok().unwrap().into_inner().unwrap()
}

/// POST /v1/generate; an I/O error (refused, reset, timed out) is the request lost, not a panic.
fn try_post(addr: SocketAddr, body: &serde_json::Value) -> std::io::Result<Resp> {
    let mut s = std::net::TcpStream::connect_timeout(&addr, Duration::from_secs(5))?;
    s.set_read_timeout(Some(Duration::from_secs(60)))?;
    s.set_write_timeout(Some(Duration::from_secs(10)))?;
    let body = body.to_string();
    let head = request_head(
        "POST",
        "/v1/generate",
        &[("Content-Type", "application/json")],
        Some(body.len()),
    );
    s.write_all(head.as_bytes())?;
    s.write_all(body.as_bytes())?;
    read_response(&mut s)
}

fn b64_field(v: &serde_json::Value) -> Vec<u8> {
    use base64::Engine as _;
    base64::engine::general_purpose::STANDARD
        .decode(v.as_str().expect("base64"))
        .expect("valid base64")
}

fn report(what: &str, t: &Tally, total: usize, took: Duration) {
    eprintln!(
        "{what}: {total} requests, {} answered, {} retries ({} after a 502 or a dropped connection), {} lost; p50 {:.2} s, p99 {:.2} s; {:.1} req/s; served by {:?}",
        t.answered,
        t.retried,
        t.gateway_errors,
        t.lost.len(),
        t.percentile(0.5).as_secs_f64(),
        t.percentile(0.99).as_secs_f64(),
        total as f64 / took.as_secs_f64(),
        t.served_by
    );
}

fn same_pixels_per_seed(t: &Tally) {
    for (seed, pngs) in &t.images {
        assert_eq!(
            pngs.len(),
            1,
            "seed {seed} gave {} different images",
            pngs.len()
        );
    }
}

#[test]
fn replicas_behind_haproxy_lose_no_request_when_one_drains_and_one_dies() {
    let replicas = [
        Replica::start("r1"),
        Replica::start("r2"),
        Replica::start("r3"),
    ];
    let requests = 96;

    // Steady state, one replica and then three, for the latency figures.
    for n in [1, 3] {
        let lb = Balancer::start(&replicas.iter().take(n).collect::<Vec<_>>());
        let t0 = Instant::now();
        let t = load(lb.addr, requests, |_| {});
        report(
            &format!("{n} replica(s), steady"),
            &t,
            requests,
            t0.elapsed(),
        );
        assert!(
            t.lost.is_empty(),
            "lost: {:?}\nHAProxy:\n{}",
            t.lost,
            lb.log_tail()
        );
        assert_eq!(t.answered, requests);
        same_pixels_per_seed(&t);
        if n == 3 {
            assert!(
                t.served_by.len() >= 2,
                "the balancer used one replica: {:?}",
                t.served_by
            );
        }
    }

    // Faults: a third of the way through, r1 drains (SIGTERM); two thirds through, r2 dies (SIGKILL).
    let lb = Balancer::start(&replicas.iter().collect::<Vec<_>>());
    let pids = (replicas[0].child.id(), replicas[1].child.id());
    let fired = Arc::new(Mutex::new((false, false)));
    let t0 = Instant::now();
    let faults = fired.clone();
    let t = load(lb.addr, requests * 2, move |done| {
        let mut f = faults.lock().unwrap();
        if done >= requests * 2 / 3 && !f.0 {
            f.0 = true;
            signal(pids.0, "-TERM");
        }
        if done >= requests * 4 / 3 && !f.1 {
            f.1 = true;
            signal(pids.1, "-KILL");
        }
    });
    report(
        "3 replicas, r1 drained and r2 killed mid-load",
        &t,
        requests * 2,
        t0.elapsed(),
    );
    assert_eq!(
        *fired.lock().unwrap(),
        (true, true),
        "both faults happened under load"
    );
    assert!(
        t.lost.is_empty(),
        "lost: {:?}\nHAProxy:\n{}",
        t.lost,
        lb.log_tail()
    );
    assert_eq!(t.answered, requests * 2);
    same_pixels_per_seed(&t);

    // The drained replica finished its work and exited cleanly; the killed one is gone; r3 still serves.
    let mut r1 = replicas;
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(s) = r1[0].child.try_wait().unwrap() {
            break s;
        }
        assert!(
            Instant::now() < deadline,
            "the drained replica did not exit"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(status.success(), "the drained replica exited with {status}");
    r1[2].signal("-TERM");
}
