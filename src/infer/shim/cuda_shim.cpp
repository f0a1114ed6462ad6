// convoflow's CUDA shim: what tch 0.24 does not expose — streams from libtorch's pool, the
// thread-local current stream, events, synchronisation and the caching allocator's statistics —
// through c10's device-generic interfaces, so no CUDA headers are needed. Every entry point
// catches C++ exceptions and reports them as a message; none is called unless
// cf_cuda_guard_available() says the CUDA backend is registered.
#include <c10/core/AllocatorConfig.h>
#include <c10/core/CachingDeviceAllocator.h>
#include <c10/core/Event.h>
#include <c10/core/Stream.h>
#include <c10/core/impl/DeviceGuardImplInterface.h>

#include <cstdint>
#include <cstdio>
#include <exception>

extern "C" {

struct cf_stream {
  int64_t id;
  int8_t device_index;
  int8_t device_type;
};

struct cf_memory {
  int64_t allocated_current;
  int64_t allocated_peak;
  int64_t reserved_current;
  int64_t reserved_peak;
  int64_t num_ooms;
  int64_t device_free;
  int64_t device_total;
};

int cf_cuda_guard_available() {
  return c10::impl::hasDeviceGuardImpl(c10::DeviceType::CUDA) ? 1 : 0;
}
}

namespace {
const c10::impl::DeviceGuardImplInterface* cuda() {
  return c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA);
}

c10::Stream unpack(const cf_stream* s) {
  return c10::Stream::unpack3(s->id, s->device_index, static_cast<c10::DeviceType>(s->device_type));
}

void pack(const c10::Stream& s, cf_stream* out) {
  auto d = s.pack3();
  out->id = d.stream_id;
  out->device_index = d.device_index;
  out->device_type = static_cast<int8_t>(d.device_type);
}

template <typename F>
int guarded(char* err, size_t errlen, F&& f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    std::snprintf(err, errlen, "%s", e.what());
  } catch (...) {
    std::snprintf(err, errlen, "unknown C++ exception");
  }
  return 1;
}
}  // namespace

extern "C" {

int cf_stream_from_pool(int device, int high_priority, cf_stream* out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    pack(cuda()->getStreamFromGlobalPool(c10::Device(c10::DeviceType::CUDA, device), high_priority != 0), out);
  });
}

int cf_current_stream(int device, cf_stream* out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { pack(cuda()->getStream(c10::Device(c10::DeviceType::CUDA, device)), out); });
}

// Makes `s` the current stream of its device on the calling thread; returns the previous one.
int cf_exchange_stream(const cf_stream* s, cf_stream* previous, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { pack(cuda()->exchangeStream(unpack(s)), previous); });
}

int cf_synchronize_stream(const cf_stream* s, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { cuda()->synchronizeStream(unpack(s)); });
}

// Work queued on `waiter` after this call starts only when everything queued on `producer`
// so far has finished (an event recorded on one, waited on by the other).
int cf_stream_wait(const cf_stream* waiter, const cf_stream* producer, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    c10::Event event(c10::DeviceType::CUDA);
    event.record(unpack(producer));
    event.block(unpack(waiter));
  });
}

// An event recorded on a stream now (heap-allocated; cf_event_destroy frees it): the host can
// wait for the work queued so far on that stream without waiting for what comes after.
int cf_event_record(const cf_stream* s, void** out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    auto* event = new c10::Event(c10::DeviceType::CUDA);
    try {
      event->record(unpack(s));
    } catch (...) {
      delete event;
      throw;
    }
    *out = event;
  });
}

int cf_event_synchronize(void* event, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { static_cast<c10::Event*>(event)->synchronize(); });
}

void cf_event_destroy(void* event) {
  delete static_cast<c10::Event*>(event);
}

int cf_memory_stats(int device, cf_memory* out, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    auto* allocator = c10::getDeviceAllocator(c10::DeviceType::CUDA);
    auto stats = allocator->getDeviceStats(static_cast<c10::DeviceIndex>(device));
    constexpr auto all = static_cast<size_t>(c10::CachingAllocator::StatType::AGGREGATE);
    out->allocated_current = stats.allocated_bytes[all].current;
    out->allocated_peak = stats.allocated_bytes[all].peak;
    out->reserved_current = stats.reserved_bytes[all].current;
    out->reserved_peak = stats.reserved_bytes[all].peak;
    out->num_ooms = stats.num_ooms;
    auto info = allocator->getMemoryInfo(static_cast<c10::DeviceIndex>(device));
    out->device_free = static_cast<int64_t>(info.first);
    out->device_total = static_cast<int64_t>(info.second);
  });
}

int cf_reset_peak(int device, char* err, size_t errlen) {
  return guarded(err, errlen, [&] {
    c10::getDeviceAllocator(c10::DeviceType::CUDA)->resetPeakStats(static_cast<c10::DeviceIndex>(device));
  });
}

// Caching-allocator settings in PYTORCH_CUDA_ALLOC_CONF syntax (e.g.
// "per_process_memory_fraction:0.95"); takes effect for allocations made after the call, so it
// is called before the first model is loaded.
int cf_set_allocator_settings(const char* settings, char* err, size_t errlen) {
  return guarded(err, errlen, [&] { c10::CachingAllocator::setAllocatorSettings(settings); });
}
}
