//! `verdict serve` over HTTPS (`--ssl-certfile`, `--ssl-keyfile`, `--ssl-ca-certs`): a CA and
//! certificates made by the test, and a rustls client that trusts only that CA.

mod http_common;

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

use http_common::{Server, tiny_models};
use rcgen::{
    BasicConstraints, CertificateParams, CertifiedIssuer, DistinguishedName, DnType, IsCa, KeyPair,
};
use serde_json::json;
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use tokio_rustls::rustls::{
    ClientConfig, ClientConnection, RootCertStore, StreamOwned, crypto::aws_lc_rs,
};

/// A CA, and certificates it signed for the server (`localhost`, 127.0.0.1) and for a client,
/// written as PEM files in `dir` (with a key of no certificate's, `other.key`).
struct Pki {
    ca: CertifiedIssuer<'static, KeyPair>,
    client: (CertificateDer<'static>, String),
}

/// Certificate parameters with a subject of their own: a leaf named as its issuer reads as
/// self-signed to OpenSSL.
fn named(names: Vec<String>, cn: &str) -> CertificateParams {
    let mut p = CertificateParams::new(names).unwrap();
    p.distinguished_name = DistinguishedName::new();
    p.distinguished_name.push(DnType::CommonName, cn);
    p
}

impl Pki {
    /// A certificate for `names` signed by the CA: (PEM certificate, PEM key, DER certificate).
    fn leaf(&self, names: &[&str]) -> (String, String, CertificateDer<'static>) {
        let key = KeyPair::generate().unwrap();
        let names: Vec<String> = names.iter().map(|n| n.to_string()).collect();
        let cn = names[0].clone();
        let cert = named(names, &cn).signed_by(&key, &self.ca).unwrap();
        (cert.pem(), key.serialize_pem(), cert.der().clone())
    }

    /// Writes a new server certificate and key; returns the certificate.
    fn write_server(&self, dir: &Path) -> CertificateDer<'static> {
        let (cert, key, der) = self.leaf(&["localhost", "127.0.0.1"]);
        std::fs::write(dir.join("server.pem"), cert).unwrap();
        std::fs::write(dir.join("server.key"), key).unwrap();
        der
    }
}

fn make_pki(dir: &Path) -> Pki {
    let mut ca_params = named(Vec::new(), "verdict test CA");
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    std::fs::write(dir.join("ca.pem"), ca.pem()).unwrap();
    let other = KeyPair::generate().unwrap().serialize_pem();
    std::fs::write(dir.join("other.key"), other).unwrap();
    let mut pki = Pki {
        ca,
        client: (CertificateDer::from(Vec::new()), String::new()),
    };
    let (_, client_key, client) = pki.leaf(&["a-client"]);
    pki.client = (client, client_key);
    pki.write_server(dir);
    pki
}

/// A client trusting only the test's CA, presenting `cert` when given.
fn client(pki: &Pki, cert: Option<&(CertificateDer<'static>, String)>) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    roots.add(pki.ca.der().clone()).unwrap();
    let builder = ClientConfig::builder_with_provider(Arc::new(aws_lc_rs::default_provider()))
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots);
    let config = match cert {
        None => builder.with_no_client_auth(),
        Some((c, key)) => builder
            .with_client_auth_cert(
                vec![c.clone()],
                PrivateKeyDer::from_pem_slice(key.as_bytes()).unwrap(),
            )
            .unwrap(),
    };
    Arc::new(config)
}

fn tls_args(dir: &Path, target: &Path, extra: &[&str]) -> Vec<String> {
    let p = |name: &str| dir.join(name).display().to_string();
    let mut args = vec![
        "--model".to_string(),
        target.display().to_string(),
        "--ssl-certfile".into(),
        p("server.pem"),
        "--ssl-keyfile".into(),
        p("server.key"),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    args
}

/// HTTPS answers as HTTP does; a plain HTTP request, or a client stuck in its handshake, gets
/// nothing and holds up no one; HTTP/2 and HTTP/1.1 are offered by ALPN.
#[test]
fn serves_https_with_the_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = tiny_models(dir.path(), 256);
    let pki = make_pki(dir.path());
    let args = tls_args(dir.path(), &target, &[]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log_dir = dir.path().to_path_buf();
    let s = Server::start_with(&args, None, &log_dir, Some(client(&pki, None)));

    // A client that connects and says nothing: the others are still answered.
    let stalled = TcpStream::connect(&s.addr).unwrap();
    let body = json!({"prompt": "the cat sat on", "max_tokens": 5, "temperature": 0});
    let t0 = std::time::Instant::now();
    let r = s.post_json("/v1/completions", &body);
    assert_eq!(r.status, 200, "{}", r.text());
    // Not after the stalled handshake's timeout (10 s): handshakes run apart.
    assert!(t0.elapsed() < Duration::from_secs(8), "{:?}", t0.elapsed());
    assert_eq!(r.json()["usage"]["completion_tokens"], 5);
    assert_eq!(s.get("/health").status, 200);

    // Plain HTTP to the HTTPS port gets no HTTP answer.
    let mut plain = TcpStream::connect(&s.addr).unwrap();
    plain
        .set_read_timeout(Some(Duration::from_secs(20)))
        .unwrap();
    http_common::write_request(&mut plain, "GET", "/health", &[], b"").unwrap();
    let mut raw = Vec::new();
    let _ = plain.read_to_end(&mut raw);
    assert!(
        !raw.starts_with(b"HTTP/"),
        "{}",
        String::from_utf8_lossy(&raw)
    );

    // ALPN: a client that asks for HTTP/2 gets it.
    let mut h2 = (*client(&pki, None)).clone();
    h2.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    let conn = ClientConnection::new(Arc::new(h2), ServerName::try_from("localhost").unwrap());
    let mut tls = StreamOwned::new(conn.unwrap(), TcpStream::connect(&s.addr).unwrap());
    tls.flush().unwrap();
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    assert_eq!(tls.conn.alpn_protocol(), Some(&b"h2"[..]));
    // Stopping does not wait for the stalled handshake's timeout (10 s).
    let mut s = s;
    s.terminate();
    let status = s.wait_exit(Duration::from_secs(7));
    assert!(
        status.is_some_and(|st| st.success()),
        "{status:?}: {}",
        s.log_text()
    );
    drop(stalled);
}

/// Client certificates as `--ssl-cert-reqs` says (vLLM's numbers): 2 serves only a client with
/// a certificate from `--ssl-ca-certs`' CAs, 1 also one without, 0 (the default) does not ask.
#[test]
fn client_certificates_as_ssl_cert_reqs_says() {
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = tiny_models(dir.path(), 256);
    let pki = make_pki(dir.path());
    let ca = dir.path().join("ca.pem").display().to_string();
    let log_dir = dir.path().to_path_buf();
    let with_cert = client(&pki, Some(&pki.client));
    let anonymous = client(&pki, None);
    for (reqs, anonymous_served) in [("2", false), ("1", true), ("0", true)] {
        let args = tls_args(
            dir.path(),
            &target,
            &["--ssl-ca-certs", &ca, "--ssl-cert-reqs", reqs],
        );
        let args: Vec<&str> = args.iter().map(String::as_str).collect();
        let mut s = Server::start_with(&args, None, &log_dir, Some(with_cert.clone()));
        assert_eq!(s.get("/v1/models").status, 200, "reqs {reqs}");
        s.tls = Some(anonymous.clone());
        let r = s.try_request("GET", "/v1/models", &[], b"");
        match anonymous_served {
            true => assert_eq!(r.unwrap().status, 200, "reqs {reqs}"),
            false => assert!(r.is_err(), "reqs {reqs}: {:?}", r.map(|r| r.status)),
        }
    }
}

/// Missing, empty or mismatched files stop the server before it listens, naming the flag.
#[test]
fn bad_certificate_files_are_named() {
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = tiny_models(dir.path(), 256);
    make_pki(dir.path());
    let p = |name: &str| dir.path().join(name).display().to_string();
    std::fs::write(dir.path().join("empty.pem"), "not a certificate\n").unwrap();
    let model = target.display().to_string();
    for (files, want) in [
        (["missing.pem", "server.key"], "--ssl-certfile"),
        (["empty.pem", "server.key"], "no certificate"),
        (["server.pem", "missing.key"], "--ssl-keyfile"),
        (["server.pem", "server.pem"], "no private key"),
        (["server.pem", "other.key"], "is the key the certificate's?"),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
            .args(["serve", "--port", "0", "--model", &model])
            .args([
                "--ssl-certfile",
                &p(files[0]),
                "--ssl-keyfile",
                &p(files[1]),
            ])
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{files:?} started");
        assert!(err.contains(want), "{files:?}: {err}");
    }
    // Flags without the ones they need, and a bad --ssl-cert-reqs, are usage errors.
    let (cert, key, ca) = (p("server.pem"), p("server.key"), p("ca.pem"));
    let both = ["--ssl-certfile", &cert, "--ssl-keyfile", &key];
    for (args, want) in [
        (vec!["--ssl-keyfile", &key], "--ssl-certfile"),
        (
            [&both[..], &["--ssl-cert-reqs", "2"]].concat(),
            "--ssl-ca-certs",
        ),
        (
            [&both[..], &["--ssl-ca-certs", &ca, "--ssl-cert-reqs", "3"]].concat(),
            "--ssl-cert-reqs",
        ),
    ] {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_verdict"))
            .args(["serve", "--port", "0", "--model", &model])
            .args(&args)
            .output()
            .unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{args:?} started");
        assert!(err.contains(want), "{args:?}: {err}");
    }
}

/// The official `openai` client over HTTPS, trusting the test's CA (as a user points it at
/// their own): a completion and a streamed chat.
#[test]
fn the_openai_client_over_https() {
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = tiny_models(dir.path(), 256);
    let pki = make_pki(dir.path());
    let args = tls_args(dir.path(), &target, &["--api-key", "sk-tls"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log_dir = dir.path().to_path_buf();
    let s = Server::start_with(&args, None, &log_dir, Some(client(&pki, None)));
    // 127.0.0.1 is among the certificate's names.
    let url = format!("{}/v1", s.url());
    let script = r#"
import sys, openai
url, ca = sys.argv[1], sys.argv[2]
c = openai.OpenAI(base_url=url, api_key="sk-tls", http_client=openai.DefaultHttpxClient(verify=ca))
r = c.completions.create(model="tiny-target", prompt="the cat", max_tokens=4, temperature=0)
assert r.usage.completion_tokens == 4, r
text = "".join(
    ch.choices[0].delta.content or ""
    for ch in c.chat.completions.create(
        model="tiny-target", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
        stream=True,
    )
    if ch.choices
)
assert text, "no streamed text"
# A client that does not trust the CA is refused before it sends anything.
try:
    openai.OpenAI(base_url=url, api_key="sk-tls", max_retries=0).models.list()
    raise SystemExit("an untrusted certificate was accepted")
except openai.APIConnectionError:
    pass
print("all checks passed")
"#;
    let py = http_common::python();
    let out = std::process::Command::new(&py)
        .args([
            "-c",
            script,
            &url,
            &dir.path().join("ca.pem").display().to_string(),
        ])
        .output()
        .unwrap_or_else(|e| panic!("cannot run {} (set VERDICT_TEST_PYTHON): {e}", py.display()));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success() && stdout.contains("all checks passed"),
        "{stdout}\n{}\nserver log:\n{}",
        String::from_utf8_lossy(&out.stderr),
        s.log_text()
    );
}

/// The certificate a TLS handshake with the server presents.
fn served_certificate(s: &Server, config: &Arc<ClientConfig>) -> CertificateDer<'static> {
    let name = ServerName::try_from("localhost").unwrap();
    let conn = ClientConnection::new(config.clone(), name).unwrap();
    let mut tls = StreamOwned::new(conn, TcpStream::connect(&s.addr).unwrap());
    while tls.conn.is_handshaking() {
        tls.conn.complete_io(&mut tls.sock).unwrap();
    }
    tls.conn.peer_certificates().unwrap()[0].clone()
}

/// `--enable-ssl-refresh`: a renewed certificate serves new connections without a restart; a
/// broken one is logged and the one in use kept.
#[test]
fn a_renewed_certificate_is_served_with_ssl_refresh() {
    let dir = tempfile::tempdir().unwrap();
    let (target, _) = tiny_models(dir.path(), 256);
    let pki = make_pki(dir.path());
    let first = served_cert_der(dir.path());
    let args = tls_args(dir.path(), &target, &["--enable-ssl-refresh"]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let log_dir = dir.path().to_path_buf();
    let config = client(&pki, None);
    let s = Server::start_with(&args, None, &log_dir, Some(config.clone()));
    assert_eq!(served_certificate(&s, &config), first);

    let renewed = pki.write_server(dir.path());
    let t0 = std::time::Instant::now();
    while served_certificate(&s, &config) != renewed {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", s.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(s.get("/health").status, 200);

    // A broken file: once it has been read (one warning more than the renewal's two writes
    // may have caused), the renewed certificate is still served.
    let warnings = || s.log_text().matches("do not load").count();
    let before = warnings();
    std::fs::write(dir.path().join("server.pem"), "garbage\n").unwrap();
    let t0 = std::time::Instant::now();
    while warnings() == before {
        assert!(t0.elapsed() < Duration::from_secs(30), "{}", s.log_text());
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(served_certificate(&s, &config), renewed);
    assert_eq!(s.get("/health").status, 200);
}

/// The DER of the server certificate PEM file in `dir`.
fn served_cert_der(dir: &Path) -> CertificateDer<'static> {
    CertificateDer::from_pem_file(dir.join("server.pem")).unwrap()
}
