//! Gives memory back to the operating system after a burst of connections. Each connection holds tens of KiB
//! of buffers while it lives; when they close, glibc's allocator keeps the freed chunks scattered through its
//! heap and the process's RSS stays at the burst's peak. When the last connection closes, [`Trimmer`] asks
//! the allocator to release free pages (`malloc_trim`), at most once a second, off the request path.

use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;

use crate::shutdown::ShutdownSignal;

/// Wakes the trimming task when the proxy goes idle.
#[derive(Debug, Default)]
pub(crate) struct Trimmer {
    idle: Notify,
}

impl Trimmer {
    /// The last connection just closed.
    pub(crate) fn idle(&self) {
        self.idle.notify_one();
    }

    /// Trims after each idle notice, no more than once a second, until `shutdown`.
    pub(crate) async fn run(self: Arc<Self>, mut shutdown: ShutdownSignal) {
        loop {
            tokio::select! {
                _ = self.idle.notified() => {}
                () = shutdown.stopped() => return,
            }
            let _ = tokio::task::spawn_blocking(release_free_memory).await;
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
}

/// Returns free heap pages to the OS where the allocator supports it.
fn release_free_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: malloc_trim takes no pointers and is thread-safe; it only releases memory glibc holds as free.
    unsafe {
        libc::malloc_trim(0);
    }
}
