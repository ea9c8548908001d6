//! Requests in flight on the doors' connections: a request counts from the moment the server hands it to
//! the services until its response body ends, so a `Register` or `Sync` stream, or an operator's event
//! watch, keeps its connection, while one that only answers HTTP/2 PINGs does not. gRPC finds the
//! connection by its remote address (tonic puts `TcpConnectInfo` in every request before the layers run);
//! admin HTTP gets it from axum's connect info.

use std::{
    net::SocketAddr,
    pin::Pin,
    sync::Arc,
    task::{Context, Poll},
};

use axum::{
    extract::{ConnectInfo, Request, connect_info::Connected},
    http,
    middleware::Next,
    response::Response,
    serve::IncomingStream,
};
use futures::future::BoxFuture;
use http_body::{Body, Frame, SizeHint};
use tonic::transport::server::{TcpConnectInfo, TlsConnectInfo};
use tower::{Layer, Service};

use super::{
    door::{Activity, Door, InFlight},
    listener::CappedListener,
};

/// Counts each gRPC request in flight on its connection of `door`.
#[derive(Debug, Clone)]
pub struct InFlightLayer {
    door: Arc<Door>,
}

/// The service of [`InFlightLayer`].
#[derive(Debug, Clone)]
pub struct InFlightService<S> {
    inner: S,
    door: Arc<Door>,
}

/// A response body that holds its request in flight until it ends.
#[derive(Debug)]
pub struct InFlightBody<B> {
    inner: B,
    request: Option<InFlight>,
}

/// The connection an admin HTTP request came on (axum's connect info).
#[derive(Debug, Clone)]
pub struct Connection(Arc<Activity>);

// === impl InFlightLayer ===

impl InFlightLayer {
    /// Counts requests on the connections of `door`.
    pub fn new(door: Arc<Door>) -> Self {
        InFlightLayer { door }
    }
}

impl<S> Layer<S> for InFlightLayer {
    type Service = InFlightService<S>;

    fn layer(&self, inner: S) -> Self::Service {
        InFlightService { inner, door: Arc::clone(&self.door) }
    }
}

// === impl InFlightService ===

impl<S, B, RB> Service<http::Request<B>> for InFlightService<S>
where
    S: Service<http::Request<B>, Response = http::Response<RB>>,
    S::Future: Send + 'static,
{
    type Response = http::Response<InFlightBody<RB>>;
    type Error = S::Error;
    type Future = BoxFuture<'static, Result<Self::Response, Self::Error>>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let request_in_flight = remote_addr(request.extensions()).and_then(|peer| self.door.enter(peer));
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await?;
            Ok(response.map(|inner| InFlightBody { inner, request: request_in_flight }))
        })
    }
}

/// The peer of a gRPC request, over TCP or TLS.
fn remote_addr(extensions: &http::Extensions) -> Option<SocketAddr> {
    if let Some(info) = extensions.get::<TcpConnectInfo>() {
        return info.remote_addr();
    }
    extensions.get::<TlsConnectInfo<TcpConnectInfo>>().and_then(|info| info.get_ref().remote_addr())
}

// === impl InFlightBody ===

impl<B: Body + Unpin> Body for InFlightBody<B> {
    type Data = B::Data;
    type Error = B::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Self::Data>, Self::Error>>> {
        let polled = Pin::new(&mut self.inner).poll_frame(cx);
        if matches!(polled, Poll::Ready(None | Some(Err(_)))) {
            self.request = None;
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

// === impl Connection ===

impl Connected<IncomingStream<'_, CappedListener>> for Connection {
    fn connect_info(stream: IncomingStream<'_, CappedListener>) -> Self {
        Connection(Arc::clone(stream.io().activity()))
    }
}

/// Axum middleware: counts the admin HTTP request in flight on its connection until its body ends.
pub async fn track(request: Request, next: Next) -> Response {
    let in_flight = request.extensions().get::<ConnectInfo<Connection>>().map(|info| info.0.0.enter());
    let response = next.run(request).await;
    match in_flight {
        Some(request) => response.map(|inner| axum::body::Body::new(InFlightBody { inner, request: Some(request) })),
        None => response,
    }
}
