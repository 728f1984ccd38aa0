;; Traps (unreachable) on every turn.
(module
  (memory (export "memory") 1024 1024 (pagesize 1))
  (func (export "wpm_init") (result i32) (i32.const 0))
  (func (export "wpm_tick") unreachable))
