//! The DirectML execution provider: adapter choice (`[providers.directml]`) and `ort`'s builder. DirectML also needs
//! two session settings ([`super::session_overrides`]).

use serde::Deserialize;

use super::values::string_enum;

string_enum! {
    /// DirectML adapter choice when no device id is given.
    pub enum DmlPerformance("DirectML performance preference") {
        Default = "default",
        HighPerformance = "high_performance",
        MinimumPower = "minimum_power",
    }
}

string_enum! {
    /// Which DirectML adapters may be picked when no device id is given.
    pub enum DmlDeviceFilter("DirectML device filter") {
        Gpu = "gpu",
        Npu = "npu",
        Any = "any",
    }
}

/// `[providers.directml]`
#[derive(Debug, Clone, Default, PartialEq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirectMlLayer {
    pub performance_preference: Option<DmlPerformance>,
    pub device_filter: Option<DmlDeviceFilter>,
}

impl DirectMlLayer {
    pub fn overlay(&mut self, top: &DirectMlLayer) {
        overlay!(self, top; performance_preference, device_filter);
    }

    pub fn resolve(&self) -> DirectMlSettings {
        let d = DirectMlSettings::default();
        DirectMlSettings {
            performance_preference: self
                .performance_preference
                .unwrap_or(d.performance_preference),
            device_filter: self.device_filter.unwrap_or(d.device_filter),
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DirectMlSettings {
    pub performance_preference: DmlPerformance,
    pub device_filter: DmlDeviceFilter,
}

impl Default for DirectMlSettings {
    fn default() -> Self {
        DirectMlSettings {
            performance_preference: DmlPerformance::HighPerformance,
            device_filter: DmlDeviceFilter::Gpu,
        }
    }
}

impl DirectMlSettings {
    /// The options of a session on adapter `device_id` (chosen by preference and filter when `None`).
    pub fn options(&self, device_id: Option<i32>) -> DirectMlOptions {
        DirectMlOptions {
            device_id,
            performance_preference: self.performance_preference,
            device_filter: self.device_filter,
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct DirectMlOptions {
    /// The adapter index; when set, ONNX Runtime ignores the preference and filter.
    pub device_id: Option<i32>,
    pub performance_preference: DmlPerformance,
    pub device_filter: DmlDeviceFilter,
}

impl DirectMlOptions {
    /// DirectML takes no option list: the entries name the fields of the registration call.
    pub(super) fn ort_options(&self) -> Vec<(&'static str, String)> {
        match self.device_id {
            Some(id) => vec![("device_id", id.to_string())],
            None => vec![
                (
                    "performance_preference",
                    self.performance_preference.name().to_string(),
                ),
                ("device_filter", self.device_filter.name().to_string()),
            ],
        }
    }

    #[cfg(feature = "directml")]
    pub(crate) fn to_ort(&self) -> ort::ep::DirectML {
        use ort::ep::directml::{DeviceFilter as F, PerformancePreference as P};
        let e = ort::ep::DirectML::default()
            .with_performance_preference(match self.performance_preference {
                DmlPerformance::Default => P::Default,
                DmlPerformance::HighPerformance => P::HighPerformance,
                DmlPerformance::MinimumPower => P::MinimumPower,
            })
            .with_device_filter(match self.device_filter {
                DmlDeviceFilter::Gpu => F::Gpu,
                DmlDeviceFilter::Npu => F::Npu,
                DmlDeviceFilter::Any => F::Any,
            });
        match self.device_id {
            Some(id) => e.with_device_id(id),
            None => e,
        }
    }
}
