//! The `shoal` binary: parse flags, start logging and tracing, run the
//! server; or `shoal healthcheck`, the exec probe.

use clap::Parser;
use shoal::config::Args;
use shoal::healthcheck::{self, HealthcheckArgs};

// glibc's malloc spent 15% of the server's CPU at concurrency 64 on the
// request path's short-lived buffers (issue 18); mimalloc's thread-local
// free lists cut CPU per request by a sixth.
#[global_allocator]
static GLOBAL: shoal::alloc::Mimalloc = shoal::alloc::Mimalloc;

fn main() -> anyhow::Result<()> {
    // A subcommand beside the server's flat flags: the server keeps its
    // Triton-like command line (`shoal --model-repository DIR`).
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "healthcheck")
    {
        let args = HealthcheckArgs::parse_from(std::env::args_os().skip(1));
        std::process::exit(healthcheck::run(&args));
    }
    let args = Args::parse();
    let mut rt = tokio::runtime::Builder::new_multi_thread();
    rt.enable_all().thread_name("shoal-net");
    if let Some(n) = args.worker_threads {
        rt.worker_threads(n.max(1));
    }
    let rt = rt.build()?;
    // The OTLP exporter's channel is made on this runtime.
    let telemetry = {
        let _in_runtime = rt.enter();
        shoal::telemetry::init(&args.telemetry())?
    };
    // Signal handlers are registered here, inside the runtime, before
    // anything is served.
    let shutdown = {
        let _in_runtime = rt.enter();
        shoal::server::shutdown_signal()
    };
    let result = rt.block_on(shoal::server::run(args, shutdown));
    // Flushed while the runtime still runs the exporter's channel.
    telemetry.shutdown();
    result?;
    Ok(())
}
