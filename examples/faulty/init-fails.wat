;; A module whose health check fails: wpm_init returns 7. A device must refuse to switch
;; to it and keep running the version it had.
(module
  (memory (export "memory") 1024 1024 (pagesize 1))
  (func (export "wpm_init") (result i32) (i32.const 7))
  (func (export "wpm_tick")))
