//! A test's child process: killed when dropped, stderr to a log file, stdout lines readable
//! as they come (servers print the addresses they bound there).

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

/// A running child process, killed (and reaped) when dropped.
pub struct Proc {
    child: Child,
    name: String,
    lines: mpsc::Receiver<String>,
    log: PathBuf,
}

impl Proc {
    /// Starts `cmd` with stderr appended to `log_dir/NAME.log` (a restarted process's log
    /// follows its earlier life's) and stdout read line by line.
    pub fn spawn(name: &str, mut cmd: Command, log_dir: &Path) -> std::io::Result<Self> {
        let path = log_dir.join(format!("{name}.log"));
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&path)?;
        let mut child = cmd.stdout(Stdio::piped()).stderr(log).spawn()?;
        let out = child
            .stdout
            .take()
            .ok_or_else(|| std::io::Error::other("the child has no stdout"))?;
        let (tx, lines) = mpsc::channel();
        std::thread::spawn(move || {
            // Keeps draining after the reader is gone, so the child never blocks on stdout.
            for l in BufReader::new(out).lines().map_while(Result::ok) {
                let _ = tx.send(l);
            }
        });
        Ok(Self {
            child,
            name: name.to_string(),
            lines,
            log: path,
        })
    }

    /// The first line of its log (stderr, this life's and earlier ones') containing `needle`,
    /// waiting up to `timeout`; the error names the process and ends with its log.
    pub fn log_line(&self, needle: &str, timeout: Duration) -> std::io::Result<String> {
        let end = Instant::now() + timeout;
        loop {
            let log = std::fs::read_to_string(&self.log)?;
            if let Some(l) = log.lines().find(|l| l.contains(needle)) {
                return Ok(l.to_string());
            }
            if Instant::now() >= end {
                let tail: Vec<&str> = log.lines().rev().take(20).collect();
                return Err(std::io::Error::other(format!(
                    "{} logged no line containing {needle:?} in {timeout:?}; its log ends: {:?}",
                    self.name,
                    tail.into_iter().rev().collect::<Vec<_>>()
                )));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The rest of the first stdout line starting with `prefix` (earlier lines are skipped),
    /// waiting up to `timeout`; the error names the process and what it printed.
    pub fn line_after(&self, prefix: &str, timeout: Duration) -> std::io::Result<String> {
        let end = Instant::now() + timeout;
        let mut seen = Vec::new();
        loop {
            let left = end.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(l) => match l.strip_prefix(prefix) {
                    Some(rest) => return Ok(rest.to_string()),
                    None => seen.push(l),
                },
                Err(_) => {
                    return Err(std::io::Error::other(format!(
                        "{} printed no line starting {prefix:?} in {timeout:?} (printed: {seen:?})",
                        self.name
                    )));
                }
            }
        }
    }

    /// The exit status once the process has exited, waiting up to `timeout` (`None`: still
    /// running).
    pub fn wait_exit(
        &mut self,
        timeout: Duration,
    ) -> std::io::Result<Option<std::process::ExitStatus>> {
        let end = Instant::now() + timeout;
        loop {
            if let Some(s) = self.child.try_wait()? {
                return Ok(Some(s));
            }
            if Instant::now() >= end {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn id(&self) -> u32 {
        self.child.id()
    }

    /// Sends `signal` (`HUP`, `TERM`, ...) with `kill`.
    pub fn signal(&self, signal: &str) -> std::io::Result<()> {
        let st = Command::new("kill")
            .args([format!("-{signal}"), self.id().to_string()])
            .status()?;
        if !st.success() {
            return Err(std::io::Error::other(format!(
                "kill -{signal} {} ({}) failed",
                self.id(),
                self.name
            )));
        }
        Ok(())
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}
