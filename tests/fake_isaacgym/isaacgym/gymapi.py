"""A physics-free stand-in for isaacgym.gymapi, enough to run IsaacGymBackend's own code on a CPU.

Nothing moves unless written: root states written through the tensor API stay where they are put (no
gravity, no contacts), and each finger reaches its position target at the next simulate(). Cameras return
black images. Calls are checked for the argument types the real API takes (stub signatures), and the URDF
given to load_asset is parsed. It proves the backend's bookkeeping (layout, teleported gripper, attached
grasp, tensor indexing), never Isaac Gym's behaviour. It also holds the backend to one root-state set per
simulate() and no refresh between a set and the simulate() that applies it.
"""
import os
import xml.etree.ElementTree as ET
from types import SimpleNamespace

import numpy as np

SIM_PHYSX, UP_AXIS_Z, MESH_VISUAL, DOMAIN_SIM, IMAGE_COLOR, FOLLOW_TRANSFORM = "physx", "z", "visual", "sim", "rgb", "ft"
DOF_MODE_POS = 1


class Vec3:
    def __init__(self, x=0.0, y=0.0, z=0.0):
        self.x, self.y, self.z = float(x), float(y), float(z)


class Quat:
    def __init__(self, x=0.0, y=0.0, z=0.0, w=1.0):
        self.x, self.y, self.z, self.w = float(x), float(y), float(z), float(w)


class Transform:
    def __init__(self, p=None, r=None):
        self.p, self.r = p or Vec3(), r or Quat()


class SimParams:
    def __init__(self):
        self.physx = SimpleNamespace()


class AssetOptions:
    def __init__(self):
        self.fix_base_link = self.disable_gravity = False
        self.density = 1000.0


class CameraProperties:
    def __init__(self):
        self.width = self.height = 128
        self.horizontal_fov = 90.0
        self.enable_tensors = False


class Tensor:
    def __init__(self, torch_tensor=None):
        self.torch = torch_tensor


class Sim:
    pass


class Env:
    pass


class Gym:
    def __init__(self):
        self.actors = []  # (pose, dof count, name)
        self.calls = []
        self.sim = None
        self.pending_root_set = False

    def create_sim(self, compute_device, graphics_device, type, params):
        assert type == SIM_PHYSX and isinstance(params, SimParams) and params.up_axis == UP_AXIS_Z
        self.params, self.sim = params, Sim()
        return self.sim

    def create_env(self, sim, lower, upper, per_row):
        assert isinstance(lower, Vec3) and isinstance(upper, Vec3)
        self.env = Env()
        return self.env

    def create_box(self, sim, w, h, d, options):
        return {"dofs": 0, "size": (w, h, d)}

    def load_asset(self, sim, root, filename, options):
        robot = ET.parse(os.path.join(root, filename)).getroot()
        joints = [j for j in robot.iter("joint") if j.get("type") == "prismatic"]
        assert len(joints) == 2 and {l.get("name") for l in robot.iter("link")} == {"palm", "finger_l", "finger_r"}
        return {"dofs": len(joints), "bodies": ["palm", "finger_l", "finger_r"]}

    def create_actor(self, env, asset, pose, name, group, filter):
        assert isinstance(pose, Transform) and isinstance(filter, int)
        self.actors.append((pose, asset["dofs"], name))
        return len(self.actors) - 1

    def set_rigid_body_color(self, env, actor, body, mesh, colour):
        assert isinstance(colour, Vec3) and 0 <= colour.x <= 1

    def get_actor_rigid_shape_properties(self, env, actor):
        return [SimpleNamespace(friction=0.5)]

    def set_actor_rigid_shape_properties(self, env, actor, props):
        return True

    def get_actor_dof_properties(self, env, actor):
        n = self.actors[actor][1]
        return np.zeros(n, dtype=[("driveMode", "i4"), ("stiffness", "f4"), ("damping", "f4")])

    def set_actor_dof_properties(self, env, actor, props):
        assert (props["driveMode"] == DOF_MODE_POS).all() and (props["stiffness"] > 0).all()
        return True

    def find_actor_rigid_body_handle(self, env, actor, name):
        return 0

    def get_actor_index(self, env, actor, domain):
        assert domain == DOMAIN_SIM
        return actor

    def create_camera_sensor(self, env, props):
        assert isinstance(props, CameraProperties)
        self.image_size = props.width
        return 0

    def set_camera_location(self, cam, env, position, target):
        assert isinstance(position, Vec3) and isinstance(target, Vec3)

    def attach_camera_to_body(self, cam, env, body, transform, mode):
        assert isinstance(transform, Transform)

    def set_light_parameters(self, sim, index, intensity, ambient, direction):
        assert all(isinstance(v, Vec3) for v in (intensity, ambient, direction))

    def prepare_sim(self, sim):
        import torch

        self.root = torch.zeros(len(self.actors), 13)
        for i, (pose, _, _) in enumerate(self.actors):
            self.root[i, :7] = torch.tensor([pose.p.x, pose.p.y, pose.p.z, pose.r.x, pose.r.y, pose.r.z, pose.r.w])
        self.dofs = torch.zeros(sum(a[1] for a in self.actors), 2)
        self.targets = torch.zeros(len(self.dofs))
        return True

    def acquire_actor_root_state_tensor(self, sim):
        return Tensor(self.root)

    def acquire_dof_state_tensor(self, sim):
        return Tensor(self.dofs)

    def get_sim_dof_count(self, sim):
        return len(self.dofs)

    def refresh_actor_root_state_tensor(self, sim):
        assert not self.pending_root_set, "refresh between a root-state set and the simulate() that applies it"
        return True

    def refresh_dof_state_tensor(self, sim):
        return True

    def set_actor_root_state_tensor_indexed(self, sim, root, indices, count):
        import torch

        assert not self.pending_root_set, "a second root-state set before simulate()"
        self.pending_root_set = True
        assert indices.torch.dtype == torch.int32 and len(indices.torch) == count and root.torch.shape[1] == 13
        self.root[indices.torch.long()] = root.torch[indices.torch.long()]
        self.calls.append(("set_root", indices.torch.tolist()))
        return True

    def set_dof_state_tensor(self, sim, state):
        self.dofs[:] = state.torch
        return True

    def set_dof_position_target_tensor(self, sim, targets):
        self.targets[:] = targets.torch
        return True

    def simulate(self, sim):
        self.pending_root_set = False
        self.dofs[:, 0] = self.targets

    def fetch_results(self, sim, wait):
        assert wait is True

    def step_graphics(self, sim):
        pass

    def render_all_camera_sensors(self, sim):
        pass

    def get_camera_image(self, sim, env, cam, kind):
        assert kind == IMAGE_COLOR
        return np.zeros((self.image_size, self.image_size * 4), dtype=np.uint8)

    def destroy_camera_sensor(self, sim, env, cam):
        pass

    def destroy_sim(self, sim):
        self.calls.append(("destroy_sim",))
        self.sim = None


_GYM = Gym()


def acquire_gym():
    return _GYM
