//! A read-only client for the Cilium agent's REST API on its unix socket
//! (`/var/run/cilium/cilium.sock`): HTTP/1.1 GETs through hyper, each bounded in time and size.
//! Errors say what the socket did (absent, refused, silent), since that is itself the agent's
//! state: a v1.16 agent accepts connections while it starts but answers only once its daemon
//! is initialized (`daemon/cmd/api_handlers.go`: every handler awaits the daemon promise).

use std::path::{Path, PathBuf};
use std::time::Duration;

use http_body_util::{BodyExt as _, Empty, Limited};
use hyper::body::Bytes;
use hyper_util::rt::TokioIo;
use serde::de::DeserializeOwned;

/// Largest response read (an endpoint list of a full node is a few MiB).
const MAX_RESPONSE: usize = 64 << 20;

#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error("no socket at {0}")]
    Absent(PathBuf),
    #[error("connection to {0} refused: nothing listens on it")]
    Refused(PathBuf),
    #[error("no access to {path}: {source}")]
    Denied {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("{what} got no answer within {timeout:?}")]
    Timeout { what: String, timeout: Duration },
    #[error("GET {path}: HTTP {status}: {body}")]
    Status {
        path: String,
        status: u16,
        body: String,
    },
    #[error("GET {path}: decoding the answer: {message}")]
    Decode { path: String, message: String },
    #[error("GET {path} on {socket}: {message}")]
    Io {
        path: String,
        socket: PathBuf,
        message: String,
    },
}

#[derive(Clone, Debug)]
pub struct ApiClient {
    pub socket: PathBuf,
    pub timeout: Duration,
}

impl ApiClient {
    pub fn new(socket: &Path, timeout: Duration) -> ApiClient {
        ApiClient {
            socket: socket.to_owned(),
            timeout,
        }
    }

    /// `GET path`, decoded from JSON.
    pub async fn get<T: DeserializeOwned>(&self, path: &str) -> Result<T, ApiError> {
        let body = self.get_bytes(path).await?;
        serde_json::from_slice(&body).map_err(|e| ApiError::Decode {
            path: path.to_owned(),
            message: e.to_string(),
        })
    }

    /// `GET path`: the body of a 2xx answer.
    pub async fn get_bytes(&self, path: &str) -> Result<Bytes, ApiError> {
        let io = |e: &dyn std::fmt::Display| ApiError::Io {
            path: path.to_owned(),
            socket: self.socket.clone(),
            message: e.to_string(),
        };
        let timeout = |what: &str| ApiError::Timeout {
            what: format!("{what} {}", self.socket.display()),
            timeout: self.timeout,
        };
        let stream =
            match tokio::time::timeout(self.timeout, tokio::net::UnixStream::connect(&self.socket))
                .await
            {
                Err(_) => return Err(timeout("connecting to")),
                Ok(Err(e)) => {
                    return Err(match e.kind() {
                        std::io::ErrorKind::NotFound => ApiError::Absent(self.socket.clone()),
                        std::io::ErrorKind::ConnectionRefused => {
                            ApiError::Refused(self.socket.clone())
                        }
                        std::io::ErrorKind::PermissionDenied => ApiError::Denied {
                            path: self.socket.clone(),
                            source: e,
                        },
                        _ => io(&e),
                    });
                }
                Ok(Ok(s)) => s,
            };
        let (mut sender, conn) =
            hyper::client::conn::http1::handshake::<_, Empty<Bytes>>(TokioIo::new(stream))
                .await
                .map_err(|e| io(&e))?;
        let conn = tokio::spawn(conn);
        let result = async {
            let request = hyper::Request::get(path)
                .header(hyper::header::HOST, "localhost")
                .body(Empty::new())
                .map_err(|e| io(&e))?;
            let response = tokio::time::timeout(self.timeout, sender.send_request(request))
                .await
                .map_err(|_| timeout(&format!("GET {path} on")))?
                .map_err(|e| io(&e))?;
            let status = response.status();
            let body = tokio::time::timeout(
                self.timeout,
                Limited::new(response.into_body(), MAX_RESPONSE).collect(),
            )
            .await
            .map_err(|_| timeout(&format!("reading GET {path} from")))?
            .map_err(|e| io(&*e))?
            .to_bytes();
            if !status.is_success() {
                let text = String::from_utf8_lossy(&body[..body.len().min(300)])
                    .trim()
                    .to_owned();
                return Err(ApiError::Status {
                    path: path.to_owned(),
                    status: status.as_u16(),
                    body: text,
                });
            }
            Ok(body)
        }
        .await;
        conn.abort();
        result
    }
}
