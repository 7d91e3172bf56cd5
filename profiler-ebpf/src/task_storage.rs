//! A task-local storage map (`BPF_MAP_TYPE_TASK_STORAGE`), which aya-ebpf
//! only defines inside its crate: a value hangs off each task that has one,
//! found through the task itself, with no hashing and no bucket lock. The
//! kernel frees it when the task exits.
use core::ptr;

use aya_ebpf::{
    bindings::{task_struct, BPF_F_NO_PREALLOC, BPF_LOCAL_STORAGE_GET_F_CREATE},
    helpers::{bpf_task_storage_delete, bpf_task_storage_get},
};

/// `BPF_MAP_TYPE_TASK_STORAGE`.
const TASK_STORAGE: usize = 29;

/// The map's definition, in the BTF layout loaders read from `.maps`: each
/// field's type encodes one attribute. Task storage needs `max_entries` 0
/// and `BPF_F_NO_PREALLOC`.
#[repr(C)]
pub struct TaskStorage<T> {
    r#type: *const [i32; TASK_STORAGE],
    key: *const i32,
    value: *const T,
    max_entries: *const [i32; 0],
    map_flags: *const [i32; BPF_F_NO_PREALLOC as usize],
}

// SAFETY: placeholder pointers the loader replaces; never dereferenced.
unsafe impl<T> Sync for TaskStorage<T> {}

impl<T> TaskStorage<T> {
    pub const fn new() -> Self {
        TaskStorage {
            r#type: ptr::null(),
            key: ptr::null(),
            value: ptr::null(),
            max_entries: ptr::null(),
            map_flags: ptr::null(),
        }
    }

    /// The value of `task`, or null if it has none.
    ///
    /// # Safety
    /// `task` must be a task pointer the verifier trusts (a BTF argument of
    /// a tp_btf program, or `bpf_get_current_task_btf`).
    #[inline(always)]
    pub unsafe fn get(&self, task: *mut task_struct) -> *mut T {
        let map = ptr::from_ref(self).cast_mut().cast();
        unsafe { bpf_task_storage_get(map, task.cast(), ptr::null_mut(), 0) }.cast()
    }

    /// The value of `task`, created (zeroed) if it has none; null if it
    /// cannot be created.
    ///
    /// # Safety
    /// As [`TaskStorage::get`].
    #[inline(always)]
    pub unsafe fn get_or_create(&self, task: *mut task_struct) -> *mut T {
        let map = ptr::from_ref(self).cast_mut().cast();
        unsafe {
            bpf_task_storage_get(
                map,
                task.cast(),
                ptr::null_mut(),
                u64::from(BPF_LOCAL_STORAGE_GET_F_CREATE),
            )
        }
        .cast()
    }

    /// Drops `task`'s value, if it has one.
    ///
    /// # Safety
    /// As [`TaskStorage::get`].
    #[inline(always)]
    pub unsafe fn delete(&self, task: *mut task_struct) {
        let map = ptr::from_ref(self).cast_mut().cast();
        let _ = unsafe { bpf_task_storage_delete(map, task.cast()) };
    }
}
