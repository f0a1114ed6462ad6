//! CUDA streams, events and allocator statistics through the C++ shim
//! (src/infer/shim/cuda_shim.cpp). libtorch's current stream is per thread and its stream pool
//! is global: a worker thread takes a stream from the pool and makes it current with a
//! `StreamGuard`, and every kernel it launches from then on runs on that stream, so models on
//! different threads overlap on one GPU.

use std::ffi::{CStr, c_char, c_int};

#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct RawStream {
    id: i64,
    device_index: i8,
    device_type: i8,
}

#[repr(C)]
#[derive(Debug, Default, Clone, Copy)]
struct RawMemory {
    allocated_current: i64,
    allocated_peak: i64,
    reserved_current: i64,
    reserved_peak: i64,
    num_ooms: i64,
    device_free: i64,
    device_total: i64,
}

unsafe extern "C" {
    fn cf_cuda_guard_available() -> c_int;
    fn cf_stream_from_pool(device: c_int, high_priority: c_int, out: *mut RawStream, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_current_stream(device: c_int, out: *mut RawStream, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_exchange_stream(s: *const RawStream, previous: *mut RawStream, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_synchronize_stream(s: *const RawStream, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_stream_wait(waiter: *const RawStream, producer: *const RawStream, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_event_record(s: *const RawStream, out: *mut *mut std::ffi::c_void, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_event_synchronize(event: *mut std::ffi::c_void, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_event_destroy(event: *mut std::ffi::c_void);
    fn cf_memory_stats(device: c_int, out: *mut RawMemory, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_reset_peak(device: c_int, err: *mut c_char, errlen: usize) -> c_int;
    fn cf_set_allocator_settings(settings: *const c_char, err: *mut c_char, errlen: usize) -> c_int;
}

#[derive(Debug, thiserror::Error)]
#[error("cuda: {0}")]
pub struct CudaError(String);

/// Calls a shim function with an error buffer.
fn call(f: impl FnOnce(*mut c_char, usize) -> c_int) -> Result<(), CudaError> {
    let mut buf = [0 as c_char; 1024];
    if f(buf.as_mut_ptr(), buf.len()) == 0 {
        Ok(())
    } else {
        // SAFETY: the shim always writes a NUL-terminated message on failure
        Err(CudaError(unsafe { CStr::from_ptr(buf.as_ptr()) }.to_string_lossy().into_owned()))
    }
}

/// True when the CUDA backend is registered and a device is visible. The shim's other calls
/// assert inside libtorch otherwise, so everything below checks this first.
pub fn available() -> bool {
    // SAFETY: a pure query
    (unsafe { cf_cuda_guard_available() } == 1) && tch::Cuda::is_available()
}

fn ensure(device: usize) -> Result<(), CudaError> {
    if !available() {
        return Err(CudaError("no CUDA device is available to libtorch".into()));
    }
    if device >= tch::Cuda::device_count() as usize {
        return Err(CudaError(format!("no CUDA device {device}")));
    }
    Ok(())
}

/// A CUDA stream of libtorch's pool.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stream(RawStream);

impl Stream {
    pub fn from_pool(device: usize, high_priority: bool) -> Result<Self, CudaError> {
        ensure(device)?;
        let mut raw = RawStream { id: 0, device_index: 0, device_type: 0 };
        // SAFETY: out-pointer to a live struct of the shim's layout
        call(|e, n| unsafe { cf_stream_from_pool(device as c_int, c_int::from(high_priority), &mut raw, e, n) })?;
        Ok(Self(raw))
    }

    /// The calling thread's current stream on `device`.
    pub fn current(device: usize) -> Result<Self, CudaError> {
        ensure(device)?;
        let mut raw = RawStream { id: 0, device_index: 0, device_type: 0 };
        // SAFETY: as above
        call(|e, n| unsafe { cf_current_stream(device as c_int, &mut raw, e, n) })?;
        Ok(Self(raw))
    }

    pub fn id(&self) -> i64 {
        self.0.id
    }

    /// Blocks until everything queued on this stream has run.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: pointer to a live stream value
        call(|e, n| unsafe { cf_synchronize_stream(&self.0, e, n) })
    }

    /// Work queued on this stream from now on waits for what `producer` has queued so far.
    pub fn wait_for(&self, producer: &Stream) -> Result<(), CudaError> {
        // SAFETY: pointers to live stream values
        call(|e, n| unsafe { cf_stream_wait(&self.0, &producer.0, e, n) })
    }
}

/// A CUDA event recorded on a stream: marks the work queued there so far, so the host can wait
/// for exactly that work while more is queued behind it.
#[derive(Debug)]
pub struct Event(*mut std::ffi::c_void);

// SAFETY: a CUDA event may be waited on and destroyed from any thread
unsafe impl Send for Event {}

impl Event {
    /// Records an event on `stream` now.
    pub fn record(stream: &Stream) -> Result<Self, CudaError> {
        let mut raw: *mut std::ffi::c_void = std::ptr::null_mut();
        // SAFETY: pointers to a live stream value and a live out-pointer
        call(|e, n| unsafe { cf_event_record(&stream.0, &mut raw, e, n) })?;
        Ok(Self(raw))
    }

    /// Blocks until the work queued on the stream before the event has run.
    pub fn synchronize(&self) -> Result<(), CudaError> {
        // SAFETY: the event lives until drop
        call(|e, n| unsafe { cf_event_synchronize(self.0, e, n) })
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        // SAFETY: made by cf_event_record, destroyed once
        unsafe { cf_event_destroy(self.0) }
    }
}

/// Makes a stream current on this thread; restores the previous one when dropped.
pub struct StreamGuard {
    previous: RawStream,
}

impl StreamGuard {
    pub fn new(stream: &Stream) -> Result<Self, CudaError> {
        let mut previous = RawStream { id: 0, device_index: 0, device_type: 0 };
        // SAFETY: pointers to live structs
        call(|e, n| unsafe { cf_exchange_stream(&stream.0, &mut previous, e, n) })?;
        Ok(Self { previous })
    }
}

impl Drop for StreamGuard {
    fn drop(&mut self) {
        let mut ignored = RawStream { id: 0, device_index: 0, device_type: 0 };
        // SAFETY: restoring a stream the shim itself returned
        let _ = call(|e, n| unsafe { cf_exchange_stream(&self.previous, &mut ignored, e, n) });
    }
}

/// libtorch caching-allocator statistics and device memory, in bytes.
#[derive(Debug, Clone, Copy, Default, serde::Serialize)]
pub struct MemoryStats {
    pub allocated: u64,
    pub allocated_peak: u64,
    pub reserved: u64,
    pub reserved_peak: u64,
    pub out_of_memory_events: u64,
    pub device_free: u64,
    pub device_total: u64,
}

pub fn memory_stats(device: usize) -> Result<MemoryStats, CudaError> {
    ensure(device)?;
    let mut raw = RawMemory::default();
    // SAFETY: out-pointer to a live struct of the shim's layout
    call(|e, n| unsafe { cf_memory_stats(device as c_int, &mut raw, e, n) })?;
    Ok(MemoryStats {
        allocated: raw.allocated_current as u64,
        allocated_peak: raw.allocated_peak as u64,
        reserved: raw.reserved_current as u64,
        reserved_peak: raw.reserved_peak as u64,
        out_of_memory_events: raw.num_ooms as u64,
        device_free: raw.device_free as u64,
        device_total: raw.device_total as u64,
    })
}

pub fn reset_peak(device: usize) -> Result<(), CudaError> {
    ensure(device)?;
    // SAFETY: a plain call with a device index checked above
    call(|e, n| unsafe { cf_reset_peak(device as c_int, e, n) })
}

/// Caps the caching allocator at `fraction` of each device's memory (libtorch's
/// `per_process_memory_fraction`): an allocation beyond it fails as out of memory, which the
/// model runtime handles by splitting the batch. Call before the first CUDA allocation.
pub fn set_memory_fraction(fraction: f64) -> Result<(), CudaError> {
    if !available() {
        return Err(CudaError("no CUDA device".into()));
    }
    let settings = std::ffi::CString::new(format!("per_process_memory_fraction:{fraction}")).expect("no NUL");
    // SAFETY: a NUL-terminated string that outlives the call
    call(|e, n| unsafe { cf_set_allocator_settings(settings.as_ptr(), e, n) })?;
    let _ = MEMORY_FRACTION.set(fraction);
    Ok(())
}

static MEMORY_FRACTION: std::sync::OnceLock<f64> = std::sync::OnceLock::new();

/// The share of each device's memory the caching allocator may take (1.0 unless
/// `set_memory_fraction` capped it).
pub fn memory_fraction() -> f64 {
    MEMORY_FRACTION.get().copied().unwrap_or(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn without_a_gpu_every_call_is_a_clear_error_not_an_abort() {
        if available() {
            return; // covered by tests/gpu.rs on a CUDA machine
        }
        let err = Stream::from_pool(0, false).unwrap_err().to_string();
        assert!(err.contains("no CUDA device"), "{err}");
        assert!(memory_stats(0).is_err());
        assert!(Stream::current(0).is_err());
        assert!(reset_peak(0).is_err());
    }
}
