#version 3.7;
#include "colors.inc"
#include "things.inc"
global_settings { assumed_gamma 1.0 }
camera { location <0, 2, -6> look_at <0, 0.8, 0> }
light_source { <-5, 8, -6> color White }
plane { y, 0 pigment { checker color White color rgb <0.2, 0.3, 0.8> } }
object { Ball translate <-1.2, 1, 0> }
object { Ball pigment { color Red } translate <1.2, 1, 0.5> }
box { <-0.5, 0, -0.5>, <0.5, 1, 0.5> rotate y*30 pigment { color Green }
      finish { specular 0.6 } translate <0, 0, -1.5> }
