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
