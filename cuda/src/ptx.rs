//! The kernels' PTX, compiled from `kernels/*.cu` by build.rs and embedded in the binary, with
//! the PTX ISA they declare and the oldest driver that runs them.

include!(concat!(env!("OUT_DIR"), "/ptx_modules.rs"));

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_module_declares_ptx_isa_and_targets_sm_61() {
        assert!(!MODULES.is_empty());
        for (stem, ptx) in MODULES {
            let header: Vec<&str> = ptx
                .lines()
                .filter(|l| l.starts_with(".version") || l.starts_with(".target"))
                .collect();
            assert_eq!(
                header,
                [format!(".version {PTX_ISA}"), ".target sm_61".to_string()],
                "{stem}"
            );
        }
    }

    #[test]
    fn the_build_and_the_device_check_state_one_minimum_driver() {
        // device.rs tells users the minimum without the `cuda` feature's build constants.
        assert_eq!(MIN_DRIVER, crate::device::MIN_DRIVER);
    }

    #[test]
    fn smoke_kernel_is_embedded() {
        let (_, ptx) = MODULES
            .iter()
            .find(|(stem, _)| *stem == "smoke")
            .expect("kernels/smoke.cu is compiled");
        assert!(ptx.contains(".entry smoke_warp_sum_f16("));
        assert!(ptx.contains("shfl.sync.bfly"));
    }
}
