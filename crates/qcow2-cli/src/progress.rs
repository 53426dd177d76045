//! Progress bars on stderr: shown when stderr is a terminal, or forced with `-p`.

use std::sync::Arc;

use indicatif::{ProgressBar, ProgressStyle};
use qcow2_async::ops::Progress;

/// A bar and the engine callback that feeds it; `None` when no bar is wanted.
pub fn bar(force: bool) -> (Option<ProgressBar>, Option<Progress>) {
    use std::io::IsTerminal;
    if !force && !std::io::stderr().is_terminal() {
        return (None, None);
    }
    let pb = ProgressBar::new(0);
    if force && !std::io::stderr().is_terminal() {
        pb.set_draw_target(indicatif::ProgressDrawTarget::stderr_with_hz(4));
    }
    pb.set_style(
        ProgressStyle::with_template("    ({percent:>3}.00/100%) {bar:40} {bytes}/{total_bytes}")
            .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    let p = pb.clone();
    let cb: Progress = Arc::new(move |done, total| {
        p.set_length(total);
        p.set_position(done);
    });
    (Some(pb), Some(cb))
}
