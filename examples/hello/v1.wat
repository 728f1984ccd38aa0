;; hello 1.0.0: logs at start, then publishes one telemetry record per scheduler turn:
;;   {"hello":1,"ticks":NNNNNNN}
;; The host API it uses is documented in docs/host-api.md.
(module
  (import "wpm" "log" (func $log (param i32 i32 i32)))
  (import "wpm" "telemetry" (func $telemetry (param i32 i32) (result i32)))
  ;; 1 KiB of linear memory (custom page size): a device with 192 KiB of RAM cannot
  ;; give every module a 64 KiB page.
  (memory (export "memory") 1024 1024 (pagesize 1))
  (data (i32.const 0) "hello 1.0.0 started")
  (data (i32.const 64) "{\"hello\":1,\"ticks\":0000000}")
  (global $ticks (mut i32) (i32.const 0))

  (func (export "wpm_init") (result i32)
    (call $log (i32.const 2) (i32.const 0) (i32.const 19))
    (i32.const 0))

  ;; Writes $ticks as 7 decimal digits into the record, right-aligned, ending at 90.
  (func $render (local $n i32) (local $at i32)
    (local.set $n (global.get $ticks))
    (local.set $at (i32.const 90))
    (loop $digit
      (local.set $at (i32.sub (local.get $at) (i32.const 1)))
      (i32.store8 (local.get $at)
        (i32.add (i32.const 48) (i32.rem_u (local.get $n) (i32.const 10))))
      (local.set $n (i32.div_u (local.get $n) (i32.const 10)))
      (br_if $digit (i32.gt_u (local.get $at) (i32.const 83)))))

  (func (export "wpm_tick")
    (global.set $ticks (i32.add (global.get $ticks) (i32.const 1)))
    (call $render)
    (drop (call $telemetry (i32.const 64) (i32.const 27)))))
