//! ONNX Runtime's own cost per `Run`, without shoal around it: loads a model with one variant of the session or run
//! options and runs it `RUNS` times on one row of input. `scripts/ort_run_instructions.sh` counts its instructions
//! under callgrind at N and 2N runs, so the difference is the cost of a run alone.
//!
//! `ort_run_cost <model.onnx> <variant> <runs>`; the model's first input takes `[1, ...]` FP32 (its other dimensions
//! from the graph). Variants, joined with `+` (e.g. `runopts+noarena`):
//!
//! - `base`: shoal's own (`backend::ort`): `GraphOptimizationLevel::All`, one intra- and one inter-op thread, no run
//!   options;
//! - `runopts`: one `RunOptions` kept and passed to every run;
//! - `noarena`: the CPU provider without its arena (every tensor from malloc);
//! - `nomempattern`: memory pattern planning off;
//! - `extended`, `basic`, `noopt`: a lower graph optimization level;
//! - `prealloc`: the first output preallocated by the caller and passed through the run options.

use ort::{
    ep,
    memory::Allocator,
    session::{builder::GraphOptimizationLevel, OutputSelector, RunOptions, Session},
    value::{Tensor, TensorRef, ValueType},
};
use shoal::backend::ort::environment;

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let [_, model, variant, runs] = args.as_slice() else {
        return Err("usage: ort_run_cost <model.onnx> <variant> <runs>".into());
    };
    let runs: usize = runs.parse()?;
    let has = |v: &str| variant.split('+').any(|w| w == v);

    // shoal's own environment: the same library search, logger and log level as the server's.
    let mut builder = Session::builder(environment()?)?;
    if has("noarena") {
        builder = builder
            .with_execution_providers([ep::CPU::default().with_arena_allocator(false).build()])?;
    }
    let level = if has("extended") {
        GraphOptimizationLevel::Level2
    } else if has("basic") {
        GraphOptimizationLevel::Level1
    } else if has("noopt") {
        GraphOptimizationLevel::Disable
    } else {
        GraphOptimizationLevel::All
    };
    builder = builder
        .with_optimization_level(level)?
        .with_intra_threads(1)?
        .with_inter_threads(1)?;
    if has("nomempattern") {
        builder = builder.with_memory_pattern(false)?;
    }
    let mut session = builder.commit_from_file(model)?;

    let ValueType::Tensor { shape, .. } = session.inputs()[0].dtype() else {
        return Err("the first input is not a tensor".into());
    };
    let mut dims: Vec<usize> = shape.iter().map(|&d| d.max(1) as usize).collect();
    dims[0] = 1;
    let count: usize = dims.iter().product();
    let input: Vec<f32> = (0..count).map(|i| (i % 7) as f32 / 7.0).collect();
    let input_name = session.inputs()[0].name().to_string();
    let output_name = session.outputs()[0].name().to_string();
    let ValueType::Tensor {
        shape: output_shape,
        ..
    } = session.outputs()[0].dtype()
    else {
        return Err("the first output is not a tensor".into());
    };
    let mut output_dims: Vec<usize> = output_shape.iter().map(|&d| d.max(1) as usize).collect();
    output_dims[0] = 1;

    let kept = RunOptions::new()?;
    let mut checksum = 0f32;
    for _ in 0..runs {
        let value = TensorRef::from_array_view((dims.as_slice(), input.as_slice()))?;
        let inputs = ort::inputs![input_name.as_str() => value];
        let first = if has("prealloc") {
            let output = Tensor::<f32>::new(&Allocator::default(), output_dims.as_slice())?;
            let options = RunOptions::new()?.with_outputs(
                OutputSelector::no_default()
                    .with(&output_name)
                    .preallocate(&output_name, output),
            );
            let outputs = session.run_with_options(inputs, &options)?;
            outputs[0].try_extract_tensor::<f32>()?.1[0]
        } else if has("runopts") {
            let outputs = session.run_with_options(inputs, &kept)?;
            outputs[0].try_extract_tensor::<f32>()?.1[0]
        } else {
            let outputs = session.run(inputs)?;
            outputs[0].try_extract_tensor::<f32>()?.1[0]
        };
        checksum += first;
    }
    println!("{checksum}");
    Ok(())
}
