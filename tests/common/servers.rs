//! Real servers for the remote-image tests, started per test on loopback ports: nginx
//! serving a folder (static files with Range and If-Match support, and a rate-limited
//! view of it under `/slow/`), moto's S3 server, Azurite's blob server, and a TCP server
//! that accepts and never answers. Each stops when dropped. A missing program fails the
//! test loudly (`bash scripts/test.sh` installs nginx, moto and Azurite).
#![allow(dead_code)]

use std::net::{TcpListener, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// A free loopback port (bound, then released for the server to take).
pub fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

fn wait_listening(port: u16, child: &mut Child, what: &str) {
    let deadline = Instant::now() + Duration::from_secs(30);
    while TcpStream::connect(("127.0.0.1", port)).is_err() {
        if let Some(st) = child.try_wait().unwrap() {
            panic!("{what} exited before listening: {st}");
        }
        assert!(
            Instant::now() < deadline,
            "{what} is not listening on {port}"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// Runs the Python `code` with `args` (its `sys.argv[1:]`); a failure fails the test with
/// Python's error, headed `what`.
fn python(code: &str, args: &[&str], what: &str) {
    let out = Command::new("python3")
        .arg("-c")
        .arg(code)
        .args(args)
        .output()
        .expect("python3");
    assert!(
        out.status.success(),
        "{what}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// nginx serving `root` at `http://127.0.0.1:PORT/`, and at `/slow/` at 2 MiB/s per
/// connection.
pub struct Nginx {
    pub port: u16,
    child: Option<Child>,
    _conf: tempfile::TempDir,
}

impl Nginx {
    pub fn start(root: &Path) -> Nginx {
        let conf = tempfile::tempdir().unwrap();
        let port = free_port();
        // One process (no master), so that killing it kills the server.
        let text = format!(
            "daemon off;\nmaster_process off;\npid {dir}/nginx.pid;\nerror_log stderr error;\n\
             events {{ worker_connections 256; }}\n\
             http {{\n  access_log off;\n  client_body_temp_path {dir};\n  proxy_temp_path {dir};\n\
               fastcgi_temp_path {dir};\n  uwsgi_temp_path {dir};\n  scgi_temp_path {dir};\n\
               sendfile on;\n  keepalive_requests 100000;\n\
               server {{\n    listen 127.0.0.1:{port};\n    root {root};\n\
                 location /slow/ {{ alias {root}/; limit_rate 2m; }}\n  }}\n}}\n",
            dir = conf.path().display(),
            root = root.display(),
        );
        let file = conf.path().join("nginx.conf");
        std::fs::write(&file, text).unwrap();
        let mut child = Command::new(nginx_binary())
            .args(["-e", "stderr", "-p"])
            .arg(conf.path())
            .arg("-c")
            .arg(&file)
            .stdout(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("nginx not found ({e}): apt install nginx-light"));
        wait_listening(port, &mut child, "nginx");
        Nginx {
            port,
            child: Some(child),
            _conf: conf,
        }
    }

    pub fn url(&self, name: &str) -> String {
        format!("http://127.0.0.1:{}/{name}", self.port)
    }

    /// Kills the server at once (SIGKILL): connections in progress break.
    pub fn kill(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }
}

fn nginx_binary() -> PathBuf {
    // /usr/sbin is not on every user's PATH.
    let sbin = PathBuf::from("/usr/sbin/nginx");
    if sbin.exists() {
        sbin
    } else {
        PathBuf::from("nginx")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.kill();
    }
}

/// moto's S3 server at `http://127.0.0.1:PORT`, with the environment `object_store`
/// reads to reach it.
pub struct Moto {
    pub port: u16,
    child: Child,
}

impl Moto {
    pub fn start() -> Moto {
        let port = free_port();
        let mut child = Command::new("moto_server")
            .args(["-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| panic!("moto_server not found ({e}): pip install 'moto[server]'"));
        wait_listening(port, &mut child, "moto_server");
        Moto { port, child }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `AWS_*` variables for a client of this server.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AWS_ENDPOINT", self.endpoint()),
            ("AWS_ACCESS_KEY_ID", "test".into()),
            ("AWS_SECRET_ACCESS_KEY", "test".into()),
            ("AWS_REGION", "us-east-1".into()),
            ("AWS_ALLOW_HTTP", "true".into()),
        ]
    }

    /// Runs boto3 `code` with `s3` a client of this server.
    pub fn boto3(&self, code: &str) {
        let script = format!(
            "import boto3\ns3 = boto3.client('s3', endpoint_url='{}', aws_access_key_id='test', \
             aws_secret_access_key='test', region_name='us-east-1')\n{code}\n",
            self.endpoint()
        );
        python(&script, &[], "boto3");
    }

    pub fn create_bucket(&self, bucket: &str) {
        self.boto3(&format!("s3.create_bucket(Bucket='{bucket}')"));
    }

    /// Uploads (or replaces) `key` with the contents of `file`.
    pub fn upload(&self, file: &Path, bucket: &str, key: &str) {
        self.boto3(&format!(
            "s3.upload_file('{}', '{bucket}', '{key}')",
            file.display()
        ));
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Azurite's blob server (Microsoft's Azure Storage emulator) at `http://127.0.0.1:PORT`,
/// with its well-known development account. The program is `$QCOW2_TEST_AZURITE`
/// (`scripts/test.sh` installs it under `target/azurite`), else `azurite-blob` on the path.
pub struct Azurite {
    pub port: u16,
    child: Child,
    _data: tempfile::TempDir,
}

/// Creates containers and uploads blobs with Shared Key signatures (the emulator's
/// account and key are public), in Python's standard library: no SDK to install.
const AZURE_PUT: &str = r#"
import base64, email.utils, hashlib, hmac, sys, urllib.request
ACCOUNT = "devstoreaccount1"
KEY = base64.b64decode("Eby8vdM02xNOcqFlqUwJPLlmEtlCDXJ1OUzFT50uSRZ6IFsuFq2UVErCz4I6tq/K1SZFPTOtr/KBHBeksoGMGw==")
endpoint, path, source = sys.argv[1], sys.argv[2], sys.argv[3]
body = open(source, "rb").read() if source else b""
query = {} if source else {"restype": "container"}
headers = {"Content-Type": "application/octet-stream", "x-ms-version": "2021-08-06",
           "x-ms-date": email.utils.formatdate(usegmt=True)}
if source:
    headers["x-ms-blob-type"] = "BlockBlob"
signed = "".join(f"{k}:{v}\n" for k, v in sorted((k.lower(), v) for k, v in headers.items() if k.startswith("x-ms-")))
resource = f"/{ACCOUNT}/{ACCOUNT}/{path}" + "".join(f"\n{k}:{v}" for k, v in sorted(query.items()))
length = str(len(body)) if body else ""
to_sign = "\n".join(["PUT", "", "", length, "", headers["Content-Type"]] + [""] * 6) + "\n" + signed + resource
mac = hmac.new(KEY, to_sign.encode(), hashlib.sha256).digest()
headers["Authorization"] = f"SharedKey {ACCOUNT}:{base64.b64encode(mac).decode()}"
url = f"{endpoint}/{ACCOUNT}/{path}" + "".join(f"?{k}={v}" for k, v in query.items())
urllib.request.urlopen(urllib.request.Request(url, data=body, method="PUT", headers=headers))
"#;

impl Azurite {
    pub fn start() -> Azurite {
        let port = free_port();
        let data = tempfile::tempdir().unwrap();
        let program = std::env::var("QCOW2_TEST_AZURITE").unwrap_or_else(|_| "azurite-blob".into());
        let mut child = Command::new(&program)
            .args(["--blobHost", "127.0.0.1", "--blobPort", &port.to_string()])
            .arg("--location")
            .arg(data.path())
            .args(["--silent", "--skipApiVersionCheck"])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap_or_else(|e| {
                panic!("{program} not found ({e}): npm install azurite@3.35.0 (scripts/test.sh)")
            });
        wait_listening(port, &mut child, "azurite-blob");
        Azurite {
            port,
            child,
            _data: data,
        }
    }

    pub fn endpoint(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// `AZURE_*` variables for a client of this emulator.
    pub fn env(&self) -> Vec<(&'static str, String)> {
        vec![
            ("AZURE_STORAGE_USE_EMULATOR", "true".into()),
            ("AZURITE_BLOB_STORAGE_URL", self.endpoint()),
        ]
    }

    fn put(&self, path: &str, source: &str) {
        python(
            AZURE_PUT,
            &[&self.endpoint(), path, source],
            &format!("azure put {path}"),
        );
    }

    pub fn create_container(&self, container: &str) {
        self.put(container, "");
    }

    /// Uploads (or replaces) `blob` in `container` with the contents of `file`.
    pub fn upload(&self, file: &Path, container: &str, blob: &str) {
        self.put(&format!("{container}/{blob}"), file.to_str().unwrap());
    }
}

impl Drop for Azurite {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A TCP server that accepts connections and reads requests but never answers: a store
/// that hangs.
pub struct Silent {
    pub port: u16,
}

impl Silent {
    pub fn start() -> Silent {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        std::thread::spawn(move || {
            let mut held = Vec::new();
            // Bounded: the test process ends long before this many connections.
            for conn in listener.incoming().take(256).flatten() {
                held.push(conn);
            }
        });
        Silent { port }
    }
}
