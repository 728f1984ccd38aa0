;; counter 1.0.0: a 4 KiB memory (custom page size), counts its ticks in memory and
;; publishes the count as 4 little-endian bytes every turn. Its state lives in linear
;; memory, so an evicted and restored instance must continue the count, not restart it.
(module
  (import "wpm" "telemetry" (func $telemetry (param i32 i32) (result i32)))
  (memory (export "memory") 4096 4096 (pagesize 1))
  (func (export "wpm_init") (result i32) (i32.const 0))
  (func (export "wpm_tick")
    (i32.store (i32.const 0) (i32.add (i32.load (i32.const 0)) (i32.const 1)))
    (drop (call $telemetry (i32.const 0) (i32.const 4)))))
