//! The Crayfish TorchScript rows: `ffnn_torch` (libtorch) scored embedded and through the external server, every
//! event answered (`--features torch`, with `shoal` built with the same feature beside shoal-loadgen).
#![cfg(feature = "torch")]

mod common;

use shoal_loadgen::analyze::summarize;
use shoal_loadgen::pipeline::{run, Load};
use shoal_loadgen::schedule::Schedule;
use shoal_loadgen::{experiment, scorer_for, Mode};

#[tokio::test]
async fn ffnn_torch_is_scored_embedded_and_external() {
    let m = common::model_opts("ffnn_torch", "model.pt");
    for mode in [Mode::Embedded, Mode::Grpc] {
        let setup = scorer_for(mode, &m)
            .await
            .unwrap_or_else(|e| panic!("{mode:?}: {e}"));
        let exp = experiment(&m, 2, 1.0, Load::Open(Schedule::Constant { rate: 200.0 }));
        let r = run(&exp, setup.scorer.clone()).await;
        let s = summarize(&r, 0.25);
        assert!(s.reconciled, "{mode:?}: {}", s.reconciliation_line());
        assert!(r.produced >= 190, "{mode:?} produced {}", r.produced);
        assert_eq!(
            s.scored,
            r.produced,
            "{mode:?}: {}",
            s.reconciliation_line()
        );
    }
}
