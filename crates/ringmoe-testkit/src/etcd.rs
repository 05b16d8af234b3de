//! A real etcd for tests: `etcd` (Debian's etcd-server, which `scripts/test.sh` installs) on two
//! free loopback ports with a temporary data directory and fast election settings, stopped when
//! dropped. A missing `etcd` binary is an error, never a skipped test.
//!
//! [`Etcd::start_tls`] serves clients over TLS with client-certificate authentication, with a
//! CA and certificates made by the `openssl` command (also installed by `scripts/test.sh`).

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

#[derive(Debug)]
pub struct Etcd {
    child: Option<Child>,
    /// Where it listens: 127.0.0.1, or a test network host's address.
    host: std::net::IpAddr,
    /// The network namespace it runs in, on a test network.
    netns: Option<String>,
    client_port: u16,
    peer_port: u16,
    dir: PathBuf,
    tls: Option<TlsFiles>,
}

/// PEM files of a TLS etcd: the CA, etcd's certificate (for 127.0.0.1) and a client's.
#[derive(Debug, Clone)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

fn openssl(dir: &std::path::Path, args: &[&str]) -> std::io::Result<()> {
    let out = Command::new("openssl")
        .current_dir(dir)
        .args(args)
        .output()
        .map_err(|e| {
            std::io::Error::new(
                e.kind(),
                format!("running openssl (install Debian's openssl; scripts/test.sh does): {e}"),
            )
        })?;
    if !out.status.success() {
        return Err(std::io::Error::other(format!(
            "openssl {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        )));
    }
    Ok(())
}

/// A CA in `dir`, and two certificates it signed (`server`, `client`), each valid for
/// 127.0.0.1 and localhost and for both server and client use.
pub fn make_certs(dir: &std::path::Path) -> std::io::Result<TlsFiles> {
    std::fs::create_dir_all(dir)?;
    let mut ca = vec!["req", "-x509", "-days", "2", "-subj", "/CN=ringmoe-test-ca"];
    ca.extend(EC_KEY);
    ca.extend(["-keyout", "ca.key", "-out", "ca.pem"]);
    openssl(dir, &ca)?;
    for name in ["server", "client"] {
        sign_cert(dir, name, "IP:127.0.0.1,DNS:localhost")?;
    }
    Ok(TlsFiles {
        ca: dir.join("ca.pem"),
        server_cert: dir.join("server.pem"),
        server_key: dir.join("server.key"),
        client_cert: dir.join("client.pem"),
        client_key: dir.join("client.key"),
    })
}

/// A certificate `NAME.pem` (key `NAME.key`) signed by the CA [`make_certs`] made in `dir`,
/// for server and client use, valid for `san` (an openssl `subjectAltName` value such as
/// `IP:127.0.0.1,DNS:localhost`). Returns the certificate's and the key's paths.
pub fn sign_cert(
    dir: &std::path::Path,
    name: &str,
    san: &str,
) -> std::io::Result<(PathBuf, PathBuf)> {
    let ext = format!("{name}.cnf");
    std::fs::write(
        dir.join(&ext),
        format!(
            "basicConstraints=CA:FALSE\nkeyUsage=digitalSignature,keyEncipherment\n\
             extendedKeyUsage=serverAuth,clientAuth\nsubjectAltName={san}\n"
        ),
    )?;
    let (key, csr, pem) = (
        format!("{name}.key"),
        format!("{name}.csr"),
        format!("{name}.pem"),
    );
    let subj = format!("/CN={name}");
    let mut req = vec!["req", "-new", "-subj", &subj];
    req.extend(EC_KEY);
    req.extend(["-keyout", &key, "-out", &csr]);
    openssl(dir, &req)?;
    openssl(
        dir,
        &[
            "x509",
            "-req",
            "-in",
            &csr,
            "-CA",
            "ca.pem",
            "-CAkey",
            "ca.key",
            "-CAcreateserial",
            "-days",
            "2",
            "-extfile",
            &ext,
            "-out",
            &pem,
        ],
    )?;
    Ok((dir.join(pem), dir.join(key)))
}

/// openssl arguments for a fresh P-256 key without a passphrase.
const EC_KEY: [&str; 5] = [
    "-newkey",
    "ec",
    "-pkeyopt",
    "ec_paramgen_curve:prime256v1",
    "-nodes",
];

fn free_port() -> std::io::Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

impl Etcd {
    /// Starts etcd and waits until it answers `/health`.
    pub fn start() -> std::io::Result<Self> {
        Self::start_with(false)
    }

    /// Starts etcd serving clients over TLS only, requiring a client certificate signed by its
    /// CA ([`Etcd::tls`] has the files).
    pub fn start_tls() -> std::io::Result<Self> {
        Self::start_with(true)
    }

    fn start_with(tls: bool) -> std::io::Result<Self> {
        let dir = std::env::temp_dir().join(format!(
            "ringmoe-etcd-{}-{}",
            std::process::id(),
            free_port()?
        ));
        let tls = if tls {
            Some(make_certs(&dir.join("certs"))?)
        } else {
            None
        };
        let mut e = Self {
            child: None,
            host: std::net::Ipv4Addr::LOCALHOST.into(),
            netns: None,
            client_port: free_port()?,
            peer_port: free_port()?,
            dir,
            tls,
        };
        e.spawn()?;
        Ok(e)
    }

    /// Starts etcd on host `i` of a test network (its own namespace and address, the
    /// standard ports 2379 and 2380), plain.
    pub fn start_in(net: &crate::TestNet, i: usize) -> std::io::Result<Self> {
        let host = net.hosts[i].addr;
        let mut e = Self {
            child: None,
            host: host.into(),
            netns: Some(net.hosts[i].ns.clone()),
            client_port: 2379,
            peer_port: 2380,
            dir: std::env::temp_dir().join(format!(
                "ringmoe-etcd-{}-{}",
                std::process::id(),
                net.hosts[i].ns
            )),
            tls: None,
        };
        e.spawn()?;
        Ok(e)
    }

    /// `http://HOST:PORT` (`https://` with TLS).
    pub fn endpoint(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}:{}", self.host, self.client_port)
    }

    /// The certificates, for an etcd started with [`Etcd::start_tls`].
    pub fn tls(&self) -> Option<&TlsFiles> {
        self.tls.as_ref()
    }

    fn spawn(&mut self) -> std::io::Result<()> {
        let client = self.endpoint();
        let peer = format!("http://{}:{}", self.host, self.peer_port);
        let mut cmd = match &self.netns {
            None => Command::new("etcd"),
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns, "etcd"]);
                c
            }
        };
        if let Some(t) = &self.tls {
            cmd.arg("--cert-file")
                .arg(&t.server_cert)
                .arg("--key-file")
                .arg(&t.server_key)
                .arg("--trusted-ca-file")
                .arg(&t.ca)
                .arg("--client-cert-auth");
        }
        let child = cmd
            .args(["--name", "test", "--data-dir"])
            .arg(self.dir.join("data"))
            .args([
                "--listen-client-urls",
                &client,
                "--advertise-client-urls",
                &client,
                "--listen-peer-urls",
                &peer,
                "--initial-advertise-peer-urls",
                &peer,
                "--initial-cluster",
                &format!("test={peer}"),
                "--heartbeat-interval=10",
                "--election-timeout=100",
                "--log-level=error",
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .map_err(|e| {
                std::io::Error::new(
                    e.kind(),
                    format!(
                        "starting etcd (install Debian's etcd-server; scripts/test.sh does): {e}"
                    ),
                )
            })?;
        self.child = Some(child);
        self.wait_healthy(Duration::from_secs(20))
    }

    fn wait_healthy(&mut self, limit: Duration) -> std::io::Result<()> {
        let t = Instant::now();
        loop {
            if self.healthy() {
                return Ok(());
            }
            if let Some(c) = self.child.as_mut()
                && let Some(status) = c.try_wait()?
            {
                return Err(std::io::Error::other(format!("etcd exited: {status}")));
            }
            if t.elapsed() > limit {
                return Err(std::io::Error::other("etcd did not become healthy"));
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn healthy(&self) -> bool {
        let addr = std::net::SocketAddr::new(self.host, self.client_port);
        let Ok(mut s) = TcpStream::connect_timeout(&addr, Duration::from_millis(500)) else {
            return false;
        };
        if self.tls.is_some() {
            // Listening is as far as plain HTTP can tell; clients retry until it leads.
            return true;
        }
        let _ = s.set_read_timeout(Some(Duration::from_secs(1)));
        let req = "GET /health HTTP/1.0\r\nHost: etcd\r\n\r\n";
        if s.write_all(req.as_bytes()).is_err() {
            return false;
        }
        let mut body = String::new();
        let _ = s.read_to_string(&mut body);
        body.contains("\"health\":\"true\"")
    }

    /// Kills etcd (SIGKILL).
    pub fn stop(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    /// Stops etcd and starts it again on the same ports and data.
    pub fn restart(&mut self) -> std::io::Result<()> {
        self.stop();
        self.spawn()
    }
}

impl Drop for Etcd {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
