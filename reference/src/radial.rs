//! Radial attention masks (Li et al.): the paper rule (Eq. 4 plus the frame-0 sink) and the rule the
//! released code runs for `wan` and `hunyuan`.
