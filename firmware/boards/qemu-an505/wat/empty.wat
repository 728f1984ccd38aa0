;; Does nothing: measures what one call into a slot costs (fuel, store, dispatch).
(module
  (func (export "wpm_init") (result i32) (i32.const 0))
  (func (export "wpm_tick")))
