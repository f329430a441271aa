//! GPUs: where a model's replicas run (`device` in config.toml), which GPUs exist, and their memory and load.
//!
//! Everything here works on a machine without CUDA: the driver (`libcuda.so`, through `cudarc`) and NVML
//! (`libnvidia-ml.so.1`) are loaded at run time, and their absence reads as "no GPU". Only a model that asks for
//! `cuda` explicitly then fails to load; `auto` falls back to the CPU.

use std::sync::OnceLock;

/// Where one replica runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Placement {
    Cpu,
    Cuda(usize),
}

impl std::fmt::Display for Placement {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Placement::Cpu => f.write_str("cpu"),
            Placement::Cuda(n) => write!(f, "cuda:{n}"),
        }
    }
}

/// One entry of `device`: `cpu`, `cuda` (every GPU), `cuda:N` or `auto` (every GPU, else the CPU).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeviceSpec {
    Cpu,
    AnyCuda,
    Cuda(usize),
    Auto,
}

impl DeviceSpec {
    pub fn parse(s: &str) -> Result<Self, String> {
        match s.trim() {
            "cpu" => Ok(Self::Cpu),
            "cuda" | "gpu" => Ok(Self::AnyCuda),
            "auto" => Ok(Self::Auto),
            other => other
                .strip_prefix("cuda:")
                .and_then(|n| n.parse::<usize>().ok())
                .map(Self::Cuda)
                .ok_or_else(|| {
                    format!(
                        "device {other:?} is not one of \"cpu\", \"cuda\", \"cuda:N\", \"auto\""
                    )
                }),
        }
    }
}

/// The GPUs a spec list may use, given the GPUs present (by index), as one placement per slot; replica `i` takes
/// slot `i % len`. `cuda` and `auto` expand to every GPU, least loaded first, so that a model with fewer replicas
/// than GPUs lands on the emptiest ones.
pub fn expand(specs: &[DeviceSpec], gpus: &[GpuInfo]) -> Result<Vec<Placement>, String> {
    let mut by_free: Vec<&GpuInfo> = gpus.iter().collect();
    by_free.sort_by_key(|g| (g.memory_used_bytes, g.index));
    let all: Vec<Placement> = by_free.iter().map(|g| Placement::Cuda(g.index)).collect();
    let mut out = Vec::new();
    for spec in specs {
        match *spec {
            DeviceSpec::Cpu => out.push(Placement::Cpu),
            DeviceSpec::Auto if all.is_empty() => out.push(Placement::Cpu),
            DeviceSpec::Auto => out.extend(&all),
            DeviceSpec::AnyCuda if all.is_empty() => return Err(no_gpu("cuda")),
            DeviceSpec::AnyCuda => out.extend(&all),
            DeviceSpec::Cuda(n) => {
                if !gpus.iter().any(|g| g.index == n) {
                    return Err(if gpus.is_empty() {
                        no_gpu(&format!("cuda:{n}"))
                    } else {
                        format!(
                            "device cuda:{n} requested but only {} GPU(s) exist",
                            gpus.len()
                        )
                    });
                }
                out.push(Placement::Cuda(n));
            }
        }
    }
    if out.is_empty() {
        out.push(Placement::Cpu);
    }
    Ok(out)
}

fn no_gpu(asked: &str) -> String {
    format!(
        "device {asked} requested but no CUDA GPU is available ({}); use device = \"auto\" to fall back to the CPU",
        driver_status()
    )
}

/// What the CUDA driver probe found, for error messages.
pub fn driver_status() -> String {
    match discover_with_driver() {
        Ok(g) => format!("the driver reports {} device(s)", g.len()),
        Err(e) => e,
    }
}

/// One GPU as the driver and NVML see it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct GpuInfo {
    pub index: usize,
    pub name: String,
    pub memory_total_bytes: u64,
    pub memory_used_bytes: u64,
    /// Percent of time a kernel ran over NVML's last sample period; 0 without NVML.
    pub utilization_percent: u32,
}

/// The GPUs present, from the CUDA driver, with NVML's memory use and utilization when NVML loads. Empty where
/// CUDA is absent. The driver probe runs once per process; the NVML figures are read fresh on every call.
pub fn discover() -> Vec<GpuInfo> {
    static DRIVER: OnceLock<Result<Vec<GpuInfo>, String>> = OnceLock::new();
    let mut gpus = match DRIVER.get_or_init(discover_with_driver) {
        Ok(g) => g.clone(),
        Err(_) => return Vec::new(),
    };
    if let Some(nvml) = Nvml::get() {
        for g in &mut gpus {
            if let Some((used, total, util)) = nvml.device(g.index) {
                g.memory_used_bytes = used;
                g.memory_total_bytes = total;
                g.utilization_percent = util;
            }
        }
    }
    gpus
}

/// Enumerates devices through the driver API, loaded dynamically. `Err` says why there are none.
fn discover_with_driver() -> Result<Vec<GpuInfo>, String> {
    use cudarc::driver::sys;
    // SAFETY: only probes whether the library loads; cudarc's own loader would panic if it did not.
    if !unsafe { sys::is_culib_present() } {
        return Err("libcuda.so (the NVIDIA driver) is not installed".into());
    }
    let check = |what: &str, r: sys::CUresult| -> Result<(), String> {
        if r == sys::CUresult::CUDA_SUCCESS {
            Ok(())
        } else {
            Err(format!("CUDA driver {what} failed: {r:?}"))
        }
    };
    // SAFETY: plain driver API calls with valid out-pointers; the library is present (checked above).
    unsafe {
        check("cuInit", sys::cuInit(0))?;
        let mut count = 0;
        check("cuDeviceGetCount", sys::cuDeviceGetCount(&mut count))?;
        let mut out = Vec::new();
        for i in 0..count.max(0) {
            let mut dev = 0;
            check("cuDeviceGet", sys::cuDeviceGet(&mut dev, i))?;
            let mut name = [0 as std::ffi::c_char; 256];
            check(
                "cuDeviceGetName",
                sys::cuDeviceGetName(name.as_mut_ptr(), 256, dev),
            )?;
            let mut total = 0usize;
            check(
                "cuDeviceTotalMem",
                sys::cuDeviceTotalMem_v2(&mut total, dev),
            )?;
            out.push(GpuInfo {
                index: i as usize,
                name: std::ffi::CStr::from_ptr(name.as_ptr())
                    .to_string_lossy()
                    .into_owned(),
                memory_total_bytes: total as u64,
                memory_used_bytes: 0,
                utilization_percent: 0,
            });
        }
        Ok(out)
    }
}

/// The few NVML entry points shoal reads, resolved from `libnvidia-ml.so.1` at run time.
struct Nvml {
    _lib: libloading::Library,
    handle: unsafe extern "C" fn(u32, *mut *mut std::ffi::c_void) -> i32,
    memory: unsafe extern "C" fn(*mut std::ffi::c_void, *mut NvmlMemory) -> i32,
    utilization: unsafe extern "C" fn(*mut std::ffi::c_void, *mut NvmlUtilization) -> i32,
}

#[repr(C)]
#[derive(Default)]
struct NvmlMemory {
    total: u64,
    free: u64,
    used: u64,
}

#[repr(C)]
#[derive(Default)]
struct NvmlUtilization {
    gpu: u32,
    memory: u32,
}

impl Nvml {
    fn get() -> Option<&'static Nvml> {
        static NVML: OnceLock<Option<Nvml>> = OnceLock::new();
        NVML.get_or_init(|| {
            // SAFETY: NVML is a C library with no initializers beyond nvmlInit; the symbols are declared with the
            // signatures of nvml.h (v2 entry points).
            unsafe {
                let lib = libloading::Library::new("libnvidia-ml.so.1").ok()?;
                let init: libloading::Symbol<unsafe extern "C" fn() -> i32> =
                    lib.get(b"nvmlInit_v2").ok()?;
                if init() != 0 {
                    return None;
                }
                let handle = *lib.get(b"nvmlDeviceGetHandleByIndex_v2").ok()?;
                let memory = *lib.get(b"nvmlDeviceGetMemoryInfo").ok()?;
                let utilization = *lib.get(b"nvmlDeviceGetUtilizationRates").ok()?;
                Some(Nvml {
                    _lib: lib,
                    handle,
                    memory,
                    utilization,
                })
            }
        })
        .as_ref()
    }

    /// (used bytes, total bytes, utilization %) of device `index`.
    fn device(&self, index: usize) -> Option<(u64, u64, u32)> {
        let mut dev = std::ptr::null_mut();
        let mut mem = NvmlMemory::default();
        let mut util = NvmlUtilization::default();
        // SAFETY: out-pointers are valid for the call; `dev` comes from NVML itself.
        unsafe {
            if (self.handle)(u32::try_from(index).ok()?, &mut dev) != 0
                || (self.memory)(dev, &mut mem) != 0
            {
                return None;
            }
            let util = if (self.utilization)(dev, &mut util) == 0 {
                util.gpu
            } else {
                0
            };
            Some((mem.used, mem.total, util))
        }
    }
}

/// Publishes `shoal_gpus` and, per GPU, `shoal_gpu_memory_used_bytes`, `shoal_gpu_memory_total_bytes` and
/// `shoal_gpu_utilization_percent`, refreshed every `period` on a background thread. With no GPU only the count
/// (zero) is published.
pub fn spawn_metrics(period: std::time::Duration) {
    metrics::describe_gauge!("shoal_gpus", "CUDA GPUs visible to the server");
    metrics::describe_gauge!(
        "shoal_gpu_memory_used_bytes",
        metrics::Unit::Bytes,
        "GPU memory in use (all processes), from NVML"
    );
    metrics::describe_gauge!(
        "shoal_gpu_memory_total_bytes",
        metrics::Unit::Bytes,
        "GPU memory"
    );
    metrics::describe_gauge!(
        "shoal_gpu_utilization_percent",
        "Percent of the last sample period a kernel ran on the GPU, from NVML"
    );
    publish(&discover());
    let _ = std::thread::Builder::new()
        .name("shoal-gpu-metrics".into())
        .spawn(move || loop {
            std::thread::sleep(period);
            publish(&discover());
        });
}

fn publish(gpus: &[GpuInfo]) {
    metrics::gauge!("shoal_gpus").set(gpus.len() as f64);
    for g in gpus {
        let labels = [("gpu", g.index.to_string()), ("name", g.name.clone())];
        metrics::gauge!("shoal_gpu_memory_used_bytes", &labels).set(g.memory_used_bytes as f64);
        metrics::gauge!("shoal_gpu_memory_total_bytes", &labels).set(g.memory_total_bytes as f64);
        metrics::gauge!("shoal_gpu_utilization_percent", &labels)
            .set(f64::from(g.utilization_percent));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn gpu(index: usize, used: u64) -> GpuInfo {
        GpuInfo {
            index,
            name: format!("GPU {index}"),
            memory_total_bytes: 80 << 30,
            memory_used_bytes: used,
            utilization_percent: 0,
        }
    }

    #[test]
    fn device_strings_parse() {
        assert_eq!(DeviceSpec::parse("cpu"), Ok(DeviceSpec::Cpu));
        assert_eq!(DeviceSpec::parse("cuda"), Ok(DeviceSpec::AnyCuda));
        assert_eq!(DeviceSpec::parse("cuda:3"), Ok(DeviceSpec::Cuda(3)));
        assert_eq!(DeviceSpec::parse(" auto "), Ok(DeviceSpec::Auto));
        for bad in ["", "cuda:", "cuda:-1", "cuda:x", "tpu", "CUDA"] {
            let e = DeviceSpec::parse(bad).unwrap_err();
            assert!(e.contains("cuda:N"), "{bad}: {e}");
        }
    }

    #[test]
    fn auto_falls_back_to_cpu_and_cuda_fails_clearly_without_gpus() {
        assert_eq!(expand(&[DeviceSpec::Auto], &[]), Ok(vec![Placement::Cpu]));
        for spec in [DeviceSpec::AnyCuda, DeviceSpec::Cuda(0)] {
            let e = expand(&[spec], &[]).unwrap_err();
            assert!(
                e.contains("no CUDA GPU is available") && e.contains("auto"),
                "{e}"
            );
        }
        assert_eq!(expand(&[], &[]), Ok(vec![Placement::Cpu]));
    }

    #[test]
    fn replicas_spread_over_gpus_least_used_first_and_mix_with_cpu() {
        let gpus = [gpu(0, 10 << 30), gpu(1, 1 << 30)];
        assert_eq!(
            expand(&[DeviceSpec::Auto], &gpus),
            Ok(vec![Placement::Cuda(1), Placement::Cuda(0)])
        );
        assert_eq!(
            expand(&[DeviceSpec::Cuda(0), DeviceSpec::Cpu], &gpus),
            Ok(vec![Placement::Cuda(0), Placement::Cpu])
        );
        let e = expand(&[DeviceSpec::Cuda(2)], &gpus).unwrap_err();
        assert!(e.contains("cuda:2") && e.contains("2 GPU(s)"), "{e}");
    }

    #[test]
    fn discovery_without_a_driver_is_empty_not_a_panic() {
        // This machine class has no NVIDIA driver; where one exists the list matches the driver's count.
        let gpus = discover();
        match discover_with_driver() {
            Ok(d) => assert_eq!(gpus.len(), d.len()),
            Err(e) => {
                assert!(gpus.is_empty());
                assert!(!e.is_empty());
                assert!(driver_status().contains(&e));
            }
        }
    }
}
