//! The Tower middleware: admission in front of any `http::Request` service.

use std::future::Future;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};

use governor::clock::Clock;
use pin_project_lite::pin_project;
use tower::{Layer, Service};

use super::admission::{Admission, Admit, Admitted, Rejected};

/// The client key a request is admitted under, put into the request's extensions by the
/// server's identity step (API key, client IP or a named header).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct ClientKey(pub Arc<str>);

/// The key used when a request carries no [`ClientKey`]: all such requests share one
/// bucket with the `default` quota.
pub const ANONYMOUS_KEY: &str = "-";

/// Applies [`Admission`] for one route. `reject` turns a refusal into the response the
/// caller gets (the server maps it to `429` with `Retry-After` and `RateLimit*` headers).
pub struct AdmissionLayer<C: Clock, R> {
    admission: Arc<Admission<C>>,
    route: usize,
    reject: R,
}

impl<C: Clock, R> AdmissionLayer<C, R> {
    /// `route` is the route's index in the list `admission` was built from.
    pub fn new(admission: Arc<Admission<C>>, route: usize, reject: R) -> Self {
        AdmissionLayer {
            admission,
            route,
            reject,
        }
    }
}

impl<C: Clock, R: Clone> Clone for AdmissionLayer<C, R> {
    fn clone(&self) -> Self {
        AdmissionLayer {
            admission: Arc::clone(&self.admission),
            route: self.route,
            reject: self.reject.clone(),
        }
    }
}

impl<C: Clock, R> std::fmt::Debug for AdmissionLayer<C, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionLayer")
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl<S, C: Clock, R: Clone> Layer<S> for AdmissionLayer<C, R> {
    type Service = AdmissionService<S, C, R>;

    fn layer(&self, inner: S) -> Self::Service {
        AdmissionService {
            inner,
            admission: Arc::clone(&self.admission),
            route: self.route,
            reject: self.reject.clone(),
        }
    }
}

/// The service [`AdmissionLayer`] produces.
///
/// Admission is per request and per key, so it is decided in `call`, not `poll_ready`
/// (which cannot see the request). `poll_ready` only delegates to `inner`: a refused request
/// then leaves `inner`'s readiness unused, which Tower allows — it stays reserved for the
/// next call on this service.
///
/// With the local engine the decision is made inside `call`, and the response future is
/// `inner`'s future or the ready rejection: no allocation, nothing pending. With a Redis
/// backend the decision needs a round trip, so `call` moves the `inner` that `poll_ready`
/// made ready into the response future (leaving a clone in its place, as tower's `Oneshot`
/// pattern does) and calls it there once Redis admitted the request. Dropping that future
/// drops the request before `inner` ever saw it.
pub struct AdmissionService<S, C: Clock, R> {
    inner: S,
    admission: Arc<Admission<C>>,
    route: usize,
    reject: R,
}

impl<S: Clone, C: Clock, R: Clone> Clone for AdmissionService<S, C, R> {
    fn clone(&self) -> Self {
        AdmissionService {
            inner: self.inner.clone(),
            admission: Arc::clone(&self.admission),
            route: self.route,
            reject: self.reject.clone(),
        }
    }
}

impl<S: std::fmt::Debug, C: Clock, R> std::fmt::Debug for AdmissionService<S, C, R> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AdmissionService")
            .field("inner", &self.inner)
            .field("route", &self.route)
            .finish_non_exhaustive()
    }
}

impl<S, C, R, B> Service<http::Request<B>> for AdmissionService<S, C, R>
where
    S: Service<http::Request<B>> + Clone,
    C: Clock + Send + Sync + 'static,
    R: Fn(Rejected) -> S::Response + Clone,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future = ResponseFuture<S, B, R>;

    fn poll_ready(&mut self, cx: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, mut req: http::Request<B>) -> Self::Future {
        let key = req
            .extensions()
            .get::<ClientKey>()
            .map_or(ANONYMOUS_KEY, |key| &*key.0);
        let decision = match self.admission.admit(self.route, key) {
            Admit::Ready(decision) => decision.expect("a fresh Admit holds its decision"),
            Admit::Pending(check) => {
                let clone = self.inner.clone();
                let inner = std::mem::replace(&mut self.inner, clone);
                return ResponseFuture {
                    kind: Kind::Admitting {
                        check,
                        inner: Some(inner),
                        request: Some(req),
                        reject: self.reject.clone(),
                    },
                };
            }
        };
        match decision {
            Ok(admitted) => {
                req.extensions_mut().insert(admitted);
                ResponseFuture {
                    kind: Kind::Called {
                        future: self.inner.call(req),
                    },
                }
            }
            Err(rejected) => ResponseFuture {
                kind: Kind::Rejected {
                    response: Some(refuse(&self.reject, rejected)),
                },
            },
        }
    }
}

fn refuse<T>(reject: &impl Fn(Rejected) -> T, rejected: Rejected) -> T {
    tracing::debug!(
        scope = rejected.scope.as_str(),
        wait_ms = rejected.wait.as_millis() as u64,
        "admission refused"
    );
    reject(rejected)
}

pin_project! {
    /// The response of [`AdmissionService`]: `inner`'s future, the rejection response (ready
    /// on first poll), or — with a Redis backend — the pending decision, then one of those.
    pub struct ResponseFuture<S, B, R>
    where
        S: Service<http::Request<B>>,
    {
        #[pin]
        kind: Kind<S, B, R>,
    }
}

pin_project! {
    #[project = KindProj]
    enum Kind<S, B, R>
    where
        S: Service<http::Request<B>>,
    {
        Called { #[pin] future: S::Future },
        Rejected { response: Option<S::Response> },
        Admitting {
            check: Pin<Box<dyn Future<Output = Result<Admitted, Rejected>> + Send>>,
            inner: Option<S>,
            request: Option<http::Request<B>>,
            reject: R,
        },
    }
}

impl<S, B, R> Future for ResponseFuture<S, B, R>
where
    S: Service<http::Request<B>>,
    R: Fn(Rejected) -> S::Response,
{
    type Output = Result<S::Response, S::Error>;

    fn poll(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Self::Output> {
        loop {
            let called = match self.as_mut().project().kind.project() {
                KindProj::Called { future } => return future.poll(cx),
                KindProj::Rejected { response } => {
                    return Poll::Ready(Ok(response
                        .take()
                        .expect("ResponseFuture polled after it completed")))
                }
                KindProj::Admitting {
                    check,
                    inner,
                    request,
                    reject,
                } => {
                    let decision = ready!(check.as_mut().poll(cx));
                    let mut request = request
                        .take()
                        .expect("ResponseFuture polled after it completed");
                    match decision {
                        Ok(admitted) => {
                            request.extensions_mut().insert(admitted);
                            inner
                                .take()
                                .expect("the request is still here, so inner is too")
                                .call(request)
                        }
                        Err(rejected) => return Poll::Ready(Ok(refuse(reject, rejected))),
                    }
                }
            };
            self.as_mut()
                .project()
                .kind
                .set(Kind::Called { future: called });
        }
    }
}

impl<S, B, R> std::fmt::Debug for ResponseFuture<S, B, R>
where
    S: Service<http::Request<B>>,
{
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ResponseFuture").finish_non_exhaustive()
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::task::Waker;

    use futures_util::FutureExt;
    use governor::clock::FakeRelativeClock;
    use http::{Request, Response, StatusCode};

    use super::super::{Admitted, Plans, Quota, Scope};
    use super::*;

    /// Counts calls; answers 200 with the admitted remaining tokens, or 500 if `Admitted`
    /// is missing. `poll_ready` is pending while `ready` is false.
    #[derive(Clone)]
    struct Counting {
        calls: Arc<AtomicUsize>,
        ready: bool,
    }

    impl Service<Request<()>> for Counting {
        type Response = Response<String>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<String>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            if self.ready {
                Poll::Ready(Ok(()))
            } else {
                Poll::Pending
            }
        }

        fn call(&mut self, req: Request<()>) -> Self::Future {
            self.calls.fetch_add(1, Ordering::SeqCst);
            let response = match req.extensions().get::<Admitted>() {
                Some(a) => Response::new(a.remaining.to_string()),
                None => {
                    let mut r = Response::new(String::new());
                    *r.status_mut() = StatusCode::INTERNAL_SERVER_ERROR;
                    r
                }
            };
            std::future::ready(Ok(response))
        }
    }

    fn reject(rejected: Rejected) -> Response<String> {
        let mut r = Response::new(format!(
            "{}:{}",
            rejected.scope.as_str(),
            rejected.wait.as_millis()
        ));
        *r.status_mut() = StatusCode::TOO_MANY_REQUESTS;
        r
    }

    type RejectFn = fn(Rejected) -> Response<String>;

    fn service(
        burst: u32,
    ) -> (
        AdmissionService<Counting, FakeRelativeClock, RejectFn>,
        Arc<AtomicUsize>,
    ) {
        let admission = Admission::new(
            None,
            vec![("records".into(), None)],
            Plans::new(Quota { rate: 1.0, burst }, vec![]),
            100,
            FakeRelativeClock::default(),
        );
        let calls = Arc::new(AtomicUsize::new(0));
        let layer = AdmissionLayer::new(Arc::new(admission), 0, reject as RejectFn);
        let svc = layer.clone().layer(Counting {
            calls: Arc::clone(&calls),
            ready: true,
        });
        (svc, calls)
    }

    fn request(key: Option<&str>) -> Request<()> {
        let mut req = Request::new(());
        if let Some(key) = key {
            req.extensions_mut().insert(ClientKey(Arc::from(key)));
        }
        req
    }

    fn call_now(
        svc: &mut AdmissionService<Counting, FakeRelativeClock, RejectFn>,
        req: Request<()>,
    ) -> Response<String> {
        let mut cx = Context::from_waker(Waker::noop());
        assert!(svc.poll_ready(&mut cx).is_ready());
        svc.call(req)
            .now_or_never()
            .expect("ready without waiting")
            .expect("infallible")
    }

    #[test]
    fn admitted_requests_reach_inner_with_their_key_state() {
        let (mut svc, calls) = service(3);
        let resp = call_now(&mut svc, request(Some("a")));
        assert_eq!(resp.status(), StatusCode::OK);
        assert_eq!(resp.body(), "2");
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }

    #[test]
    fn refusal_is_an_immediately_ready_reject_response_without_calling_inner() {
        let (mut svc, calls) = service(1);
        call_now(&mut svc, request(Some("a")));
        let resp = call_now(&mut svc, request(Some("a")));
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(resp.body(), &format!("{}:1000", Scope::Key.as_str()));
        assert_eq!(
            calls.load(Ordering::SeqCst),
            1,
            "inner must not see a refused request"
        );
    }

    #[test]
    fn requests_without_a_client_key_share_the_anonymous_bucket() {
        let (mut svc, calls) = service(1);
        assert_eq!(call_now(&mut svc, request(None)).status(), StatusCode::OK);
        assert_eq!(
            call_now(&mut svc, request(None)).status(),
            StatusCode::TOO_MANY_REQUESTS
        );
        assert_eq!(
            call_now(&mut svc, request(Some("a"))).status(),
            StatusCode::OK
        );
        let explicit = call_now(&mut svc, request(Some(ANONYMOUS_KEY)));
        assert_eq!(explicit.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(calls.load(Ordering::SeqCst), 2);
    }

    #[test]
    fn poll_ready_delegates_to_inner() {
        let (svc, _calls) = service(1);
        let mut svc = AdmissionService {
            inner: Counting {
                calls: Arc::new(AtomicUsize::new(0)),
                ready: false,
            },
            ..svc
        };
        let mut cx = Context::from_waker(Waker::noop());
        assert!(svc.poll_ready(&mut cx).is_pending());
        svc.inner.ready = true;
        assert!(svc.poll_ready(&mut cx).is_ready());
    }

    proptest::proptest! {
        /// Whatever the mix of keys, inner sees exactly the admitted requests, each key gets
        /// at most `burst` of them (the clock does not move), and every other request is
        /// answered by `reject`.
        #[test]
        fn inner_sees_exactly_the_admitted_requests(
            burst in 1u32..5,
            keys in proptest::collection::vec(proptest::option::of(0u8..4), 0..60),
        ) {
            let (mut svc, calls) = service(burst);
            let mut ok = std::collections::HashMap::new();
            for key in &keys {
                let name = key.map(|k| k.to_string());
                let resp = call_now(&mut svc, request(name.as_deref()));
                match resp.status() {
                    StatusCode::OK => *ok.entry(*key).or_insert(0u32) += 1,
                    status => proptest::prop_assert_eq!(status, StatusCode::TOO_MANY_REQUESTS),
                }
            }
            proptest::prop_assert_eq!(calls.load(Ordering::SeqCst) as u32, ok.values().sum::<u32>());
            proptest::prop_assert!(ok.values().all(|&n| n <= burst));
        }
    }

    #[tokio::test]
    async fn works_with_tower_service_ext() {
        use tower::ServiceExt;
        let (svc, calls) = service(1);
        let resp = svc
            .clone()
            .oneshot(request(Some("k")))
            .await
            .expect("infallible");
        assert_eq!(resp.status(), StatusCode::OK);
        let resp = svc.oneshot(request(Some("k"))).await.expect("infallible");
        assert_eq!(resp.status(), StatusCode::TOO_MANY_REQUESTS);
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
