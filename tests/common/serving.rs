//! What the API tests run: a real OpenAI-compatible LLM server — llama.cpp's server (PyPI
//! xllamacpp, scripts/fixtures/llm_server.py) serving the random-weight test model scripts/setup
//! writes (`CONVOFLOW_LLM_GGUF`, run by `CONVOFLOW_LLM_PY`); our child, killed by PID when
//! dropped, and it exits by itself when the test process ends or after 30 min — and
//! `convoflow serve`.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// The model name the server answers to.
pub const MODEL: &str = "convoflow-test-llm";

pub fn env_path(var: &str) -> PathBuf {
    PathBuf::from(std::env::var_os(var).unwrap_or_else(|| panic!("{var} is not set: run the tests with scripts/test (scripts/setup builds it)")))
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

/// Starts `command` and waits (120 s at most) for the line of its stdout that starts with
/// `prefix`, whose rest is its address; the child's stdout is read to its end by a thread.
fn start_announcing(mut command: Command, prefix: &'static str, what: &str) -> (Child, String) {
    let mut child = command.stdout(Stdio::piped()).spawn().unwrap_or_else(|e| panic!("starting {what}: {e}"));
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if let Some(address) = line.strip_prefix(prefix) {
                let _ = tx.send(address.to_string());
            }
        }
    });
    let address = rx.recv_timeout(Duration::from_secs(120)).unwrap_or_else(|_| panic!("{what} did not start within 120 s"));
    (child, address)
}

pub struct LlmServer {
    child: Child,
    pub url: String,
    pub port: u16,
}

impl LlmServer {
    /// On a free port, with a context of `ctx` tokens and `parallel` slots.
    pub fn start(ctx: usize, parallel: usize) -> Self {
        Self::start_on(free_port(), ctx, parallel)
    }

    /// On `port` (a restart at the same address after `kill`).
    pub fn start_on(port: u16, ctx: usize, parallel: usize) -> Self {
        let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/fixtures/llm_server.py");
        let mut command = Command::new(env_path("CONVOFLOW_LLM_PY"));
        command
            .arg(script)
            .arg(env_path("CONVOFLOW_LLM_GGUF"))
            .arg(port.to_string())
            .args(["--alias", MODEL, "--ctx", &ctx.to_string(), "--parallel", &parallel.to_string()])
            .args(["--exit-with-parent", "--max-seconds", "1800"])
            .stderr(Stdio::null());
        let (child, url) = start_announcing(command, "LLM_URL=", "the LLM server");
        Self { child, url, port }
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for LlmServer {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A running `convoflow serve` (our child, stopped by PID when dropped).
pub struct Serve {
    child: Child,
    pub base: String,
}

impl Serve {
    pub fn start(env: &[(String, String)]) -> Self {
        let mut command = Command::new(env!("CARGO_BIN_EXE_convoflow"));
        command.arg("serve").envs(env.iter().cloned()).env("CONVOFLOW__SERVE__LISTEN", "127.0.0.1:0").stderr(Stdio::inherit());
        let (child, base) = start_announcing(command, "convoflow serve: listening on ", "convoflow serve");
        Self { child, base }
    }
}

impl Drop for Serve {
    fn drop(&mut self) {
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
