//! Background tasks tied to the lifetime of their owner.

use tokio::task::JoinHandle;

/// Aborts its task when dropped, so a service's helpers (certificate reloader, store
/// probe, ...) end with the `Application` that started them instead of outliving it.
#[derive(Debug)]
pub struct AbortOnDrop(pub JoinHandle<()>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        self.0.abort();
    }
}

tokio::task_local! {
    static BACKGROUND: tokio::runtime::Handle;
}

/// Runs `fut` (a service's `Application::build`) so that the delivery work it sets up
/// off the request path — the audit and usage clients, their spools and the channels
/// they send on — is spawned on `background` instead of the runtime serving requests.
/// `crewmesh up` builds the data plane's services this way, with its bookkeeping
/// runtime as `background`.
pub async fn with_background<F: std::future::Future>(
    background: tokio::runtime::Handle,
    fut: F,
) -> F::Output {
    BACKGROUND.scope(background, fut).await
}

/// The runtime for work off every request's path: the one given to
/// [`with_background`], else the current one.
pub fn background() -> tokio::runtime::Handle {
    BACKGROUND
        .try_with(Clone::clone)
        .unwrap_or_else(|_| tokio::runtime::Handle::current())
}

/// Runs `f` with [`background`] as the current runtime, so that the tasks it spawns
/// (a channel's connection, a spool's sender) start there.
pub fn on_background<R>(f: impl FnOnce() -> R) -> R {
    let background = background();
    let _entered = background.enter();
    f()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn thread_name() -> String {
        std::thread::current().name().unwrap_or_default().to_owned()
    }

    #[tokio::test]
    async fn background_work_runs_where_with_background_says_and_here_otherwise() {
        let other = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(1)
            .thread_name("background-runtime")
            .enable_all()
            .build()
            .unwrap();
        let (via_handle, spawned) = with_background(other.handle().clone(), async {
            let handle = background().spawn(async { thread_name() });
            // What `on_background` runs spawns there with plain `tokio::spawn`.
            let spawned = on_background(|| tokio::spawn(async { thread_name() }));
            (handle.await.unwrap(), spawned.await.unwrap())
        })
        .await;
        assert_eq!(via_handle, "background-runtime");
        assert_eq!(spawned, "background-runtime");
        let here = background().spawn(async { thread_name() }).await.unwrap();
        assert_ne!(here, "background-runtime");
        other.shutdown_background();
    }
}
