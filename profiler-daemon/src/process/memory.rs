//! Reading another process's memory without stopping it.
//!
//! `process_vm_readv` fails cleanly (EFAULT, ESRCH) on bad addresses or a
//! process that has gone, which is exactly what reading untrusted target
//! memory needs.
use std::io;

/// Why a read of target memory failed.
#[derive(Debug, thiserror::Error)]
pub enum MemoryError {
    #[error("process {pid} has exited")]
    Gone { pid: u32 },
    #[error("no permission to read memory of process {pid} (needs CAP_SYS_PTRACE)")]
    Permission { pid: u32 },
    #[error("cannot read {len} bytes at {addr:#x} in process {pid}: {source}")]
    Fault {
        pid: u32,
        addr: u64,
        len: usize,
        source: io::Error,
    },
    #[error("short read at {addr:#x} in process {pid}: {got} of {len} bytes")]
    Short {
        pid: u32,
        addr: u64,
        len: usize,
        got: usize,
    },
}

/// Anything that can read bytes at virtual addresses of a target.
pub trait RemoteMemory {
    /// Fill `buf` with the bytes at `addr`, or fail without partial results.
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError>;

    fn read_u64(&self, addr: u64) -> Result<u64, MemoryError> {
        let mut b = [0u8; 8];
        self.read(addr, &mut b)?;
        Ok(u64::from_le_bytes(b))
    }

    fn read_u32(&self, addr: u64) -> Result<u32, MemoryError> {
        let mut b = [0u8; 4];
        self.read(addr, &mut b)?;
        Ok(u32::from_le_bytes(b))
    }

    fn read_vec(&self, addr: u64, len: usize) -> Result<Vec<u8>, MemoryError> {
        let mut v = vec![0u8; len];
        self.read(addr, &mut v)?;
        Ok(v)
    }
}

/// The threads of `pid` other than its main thread (none if it is gone).
fn other_threads(pid: u32) -> Vec<u32> {
    std::fs::read_dir(format!("/proc/{pid}/task"))
        .map(|d| {
            d.filter_map(|e| e.ok()?.file_name().to_str()?.parse().ok())
                .filter(|&tid: &u32| tid != pid)
                .collect()
        })
        .unwrap_or_default()
}

/// A live process, read with `process_vm_readv`.
#[derive(Clone, Copy, Debug)]
pub struct ProcessMemory {
    pid: u32,
}

impl ProcessMemory {
    pub fn new(pid: u32) -> Self {
        ProcessMemory { pid }
    }

    pub fn pid(&self) -> u32 {
        self.pid
    }
}

impl RemoteMemory for ProcessMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        if buf.is_empty() {
            return Ok(());
        }
        let local = libc::iovec {
            iov_base: buf.as_mut_ptr().cast(),
            iov_len: buf.len(),
        };
        let remote = libc::iovec {
            iov_base: addr as *mut libc::c_void,
            iov_len: buf.len(),
        };
        // SAFETY: `local` describes `buf`, which we own mutably; the kernel
        // validates the remote range and never writes outside `local`.
        let mut n = unsafe { libc::process_vm_readv(self.pid as i32, &local, 1, &remote, 1, 0) };
        let mut err = io::Error::last_os_error();
        if n < 0 && err.raw_os_error() == Some(libc::ESRCH) {
            // The main thread may have exited alone (pthread_exit) while
            // others run: its task has no memory any more, theirs does.
            for tid in other_threads(self.pid) {
                // SAFETY: as above.
                n = unsafe { libc::process_vm_readv(tid as i32, &local, 1, &remote, 1, 0) };
                if n >= 0 {
                    break;
                }
                err = io::Error::last_os_error();
            }
        }
        if n < 0 {
            return Err(match err.raw_os_error() {
                Some(libc::ESRCH) => MemoryError::Gone { pid: self.pid },
                Some(libc::EPERM) => MemoryError::Permission { pid: self.pid },
                _ => MemoryError::Fault {
                    pid: self.pid,
                    addr,
                    len: buf.len(),
                    source: err,
                },
            });
        }
        if n as usize != buf.len() {
            return Err(MemoryError::Short {
                pid: self.pid,
                addr,
                len: buf.len(),
                got: n as usize,
            });
        }
        Ok(())
    }
}

/// Memory made of byte regions, for tests of decoders against bytes that
/// Python itself produced.
#[derive(Clone, Debug, Default)]
pub struct SliceMemory {
    regions: Vec<(u64, Vec<u8>)>,
}

impl SliceMemory {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn add(&mut self, addr: u64, bytes: Vec<u8>) -> &mut Self {
        self.regions.push((addr, bytes));
        self
    }
}

impl RemoteMemory for SliceMemory {
    fn read(&self, addr: u64, buf: &mut [u8]) -> Result<(), MemoryError> {
        for (base, bytes) in &self.regions {
            let Some(off) = addr.checked_sub(*base) else {
                continue;
            };
            let Ok(off) = usize::try_from(off) else {
                continue;
            };
            if let Some(src) = off
                .checked_add(buf.len())
                .and_then(|end| bytes.get(off..end))
            {
                buf.copy_from_slice(src);
                return Ok(());
            }
        }
        Err(MemoryError::Fault {
            pid: 0,
            addr,
            len: buf.len(),
            source: io::Error::from_raw_os_error(libc::EFAULT),
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_own_memory() {
        let data: [u8; 5] = [1, 2, 3, 4, 5];
        let mem = ProcessMemory::new(std::process::id());
        let mut buf = [0u8; 5];
        mem.read(data.as_ptr() as u64, &mut buf).unwrap();
        assert_eq!(buf, data);
    }

    #[test]
    fn bad_address_is_an_error_not_a_crash() {
        let mem = ProcessMemory::new(std::process::id());
        let mut buf = [0u8; 8];
        assert!(matches!(
            mem.read(8, &mut buf),
            Err(MemoryError::Fault { .. })
        ));
    }

    #[test]
    fn slice_memory_bounds() {
        let mut m = SliceMemory::new();
        m.add(0x1000, vec![9; 16]);
        let mut b = [0u8; 16];
        assert!(m.read(0x1000, &mut b).is_ok());
        assert!(m.read(0x1001, &mut b).is_err());
        assert!(m.read(0xfff, &mut b[..1]).is_err());
    }
}
